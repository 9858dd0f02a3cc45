"""The ServerApp: FedAvg, or cyclical weight transfer (one site per round, in site order), from the benchmark's
initial weights; keeps the global model every `save-every` rounds for the benchmark to evaluate on the real test
cases, with the round's wall time and the sites' compute time."""

from __future__ import annotations

import json
import pathlib
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from safetensors.torch import load_file, save_file

from asyndgan_flower.task import cosine_lr, load_recipe

app = ServerApp()


def _partitions(grid: Grid, sites: int) -> dict[int, tuple[int, int]]:
    """partition-id -> (node id, slices), asking every node once (a few hundred bytes)."""
    deadline = time.monotonic() + 120
    while len(nodes := list(grid.get_node_ids())) < sites:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {sites} SuperNodes connected")
        time.sleep(0.5)
    asks = [Message(RecordDict({}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    found = {}
    for reply in grid.send_and_receive(asks, timeout=300):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
        m = reply.content["metrics"]
        found[int(m["partition-id"])] = (reply.metadata.src_node_id, int(m["num-examples"]))
    return found


class _Scheduled(FedAvg):
    """FedAvg whose rounds go to chosen nodes with their own step counts and learning rate: every node each round
    (FedAvg), or one node per round in site order (cyclical weight transfer)."""

    def __init__(self, order: list[tuple[int, int]], cyclic: bool, steps: list[int], lr: float, total: int,
                 seed: int, threads: int):
        n = 1 if cyclic else len(order)
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=len(order))
        self.order, self.cyclic, self.steps = order, cyclic, steps
        self.base_lr, self.total, self.done, self.seed, self.threads = lr, total, 0, seed, threads
        self.compute: dict[int, float] = {}

    def configure_train(self, server_round, arrays, config, grid):
        picks = [(server_round - 1) % len(self.order)] if self.cyclic else list(range(len(self.order)))
        messages = []
        for i in picks:
            cfg = ConfigRecord({"server-round": server_round, "local-steps": self.steps[i], "seed": self.seed,
                                "lr": cosine_lr(self.base_lr, self.done, self.total), "threads": self.threads})
            messages.append(Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=self.order[i][0],
                                    message_type=MessageType.TRAIN))
        self.done += max(self.steps[i] for i in picks)
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.compute[server_round] = max((float(r.content["metrics"]["compute-s"]) for r in replies
                                          if not r.has_error()), default=0.0)
        return super().aggregate_train(server_round, replies)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    data_dir, out = cfg["data-dir"], pathlib.Path(cfg["out-dir"])
    sites, rounds, k = int(cfg["sites"]), int(cfg["rounds"]), int(cfg["local-steps"])
    cyclic = cfg["method"] == "cwt"
    recipe = load_recipe(data_dir)
    parts = _partitions(grid, sites)
    order = [parts[i] for i in range(sites)]
    if cyclic and cfg["proportional"]:
        mean = sum(n for _, n in order) / sites
        steps = [max(1, round(k * n / mean)) for _, n in order]
    else:
        steps = [k] * sites
    total = sum(steps[(r - 1) % sites] for r in range(1, rounds + 1)) if cyclic else k * rounds
    strategy = _Scheduled(order, cyclic, steps, recipe["training"]["lr"], total, recipe["training"]["seed"],
                          int(cfg.get("threads", 1)))
    initial = ArrayRecord(load_file(str(pathlib.Path(data_dir) / "init.safetensors")))
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "rounds.jsonl").open("a")
    last = [time.time()]

    def keep(server_round: int, arrays: ArrayRecord):
        now = time.time()
        entry = {"round": server_round, "time": now, "seconds": now - last[0],
                 "compute_s": strategy.compute.get(server_round, 0.0)}
        last[0] = now
        if server_round % int(cfg["save-every"]) == 0 or server_round == rounds:
            state = {k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()}
            save_file(state, str(out / f"round_{server_round:04d}.safetensors"))
            entry["saved"] = True
        log.write(json.dumps(entry) + "\n")
        log.flush()
        return None

    strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, evaluate_fn=keep,
                   train_config=ConfigRecord({}))
    log.close()
    (out / "done").write_text("ok\n")
