"""A hospital's SuperNode: trains the global model on its own slices for the steps the server asks."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from asyndgan_flower.task import build_network, load_recipe, load_site, train_steps

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which site this node is (node ids are random; the benchmark's order is by partition)."""
    images, _ = load_site(context.run_config["data-dir"], int(context.node_config["partition-id"]))
    return Message(RecordDict({"metrics": MetricRecord({
        "partition-id": int(context.node_config["partition-id"]), "num-examples": len(images)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    data_dir = context.run_config["data-dir"]
    partition = int(context.node_config["partition-id"])
    cfg = msg.content["config"]
    torch.set_num_threads(int(cfg.get("threads", 1)))
    recipe = load_recipe(data_dir)
    images, masks = load_site(data_dir, partition)
    net = build_network(recipe)
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, seconds = train_steps(net, images, masks, recipe, int(cfg["local-steps"]), float(cfg["lr"]),
                                seed=int(cfg["seed"]) * 1000 + int(cfg["server-round"]) * 10 + partition)
    metrics = MetricRecord({"num-examples": len(images), "loss": loss, "compute-s": seconds,
                            "partition-id": partition})
    return Message(RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics}), reply_to=msg)
