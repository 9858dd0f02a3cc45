"""A misbehaving site for the fault tests: joins properly, then answers batches with bad gradients.

    python tests/hostile_site.py SERVER SITE_ID MODE      MODE: nan | shape | dtype | huge | oversized | order | late | slow
"""

from __future__ import annotations

import queue
import sys
import time

import grpc
import torch

from asyndgan.common import tensor_codec
from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common._generated import asyndgan_pb2_grpc as pb_grpc
from asyndgan.common.grpc_options import OPTIONS


def bad_gradient(batch: pb.SyntheticBatch, mode: str) -> pb.SiteMessage:
    fake = tensor_codec.decode(batch.fake)
    if mode == "nan":
        g = tensor_codec.encode(torch.full_like(fake, float("nan")))
    elif mode == "shape":
        g = tensor_codec.encode(torch.zeros(fake.shape[0], fake.shape[1], 3, 3))
    elif mode == "dtype":
        g = tensor_codec.encode(torch.zeros_like(fake, dtype=torch.float16))
    elif mode == "huge":  # claims a vast shape; the bytes do not match
        g = pb.Tensor(dtype="float32", shape=[1 << 20, 1 << 20], data=b"\0" * 1024)
    elif mode == "late":  # a correct answer, but only after the step deadline has passed
        time.sleep(1.5)
        g = tensor_codec.encode(torch.zeros_like(fake))
    elif mode == "slow":  # a correct answer, a little after a short step deadline (train.late_steps takes it)
        time.sleep(0.15)
        g = tensor_codec.encode(torch.zeros_like(fake))
    elif mode == "oversized":  # more bytes than any message may carry
        g = pb.Tensor(dtype="uint8", shape=[80 << 20], data=b"\0" * (80 << 20))
    else:
        raise ValueError(mode)
    return pb.SiteMessage(gradient=pb.ImageGradient(step=batch.step, round=batch.round, gradient=g))


def main() -> None:
    server, site_id, mode = sys.argv[1:4]
    out: queue.Queue = queue.Queue()
    out.put(pb.SiteMessage(hello=pb.Hello(protocol_version=1, site_id=site_id, family="image2d",
                                          modalities=["t1", "t1ce", "t2", "flair"])))
    channel = grpc.insecure_channel(server, options=OPTIONS)
    responses = pb_grpc.AsynDGANStub(channel).Train(iter(out.get, None))
    try:
        for msg in responses:
            kind = msg.WhichOneof("kind")
            if kind == "welcome":
                if mode == "order":  # a gradient before any upload: out of order
                    out.put(pb.SiteMessage(gradient=pb.ImageGradient(step=0, round=1)))
                    continue
                size = 20
                maps = torch.zeros(4, size, size, dtype=torch.uint8)
                out.put(pb.SiteMessage(conditions=pb.ConditionChunk(index=0, first_key=0,
                                                                    maps=tensor_codec.encode(maps))))
                out.put(pb.SiteMessage(ready=pb.Ready(num_chunks=1, num_samples=4)))
            elif kind == "batch":
                out.put(bad_gradient(msg.batch, mode))
    except grpc.RpcError as exc:
        print(f"disconnected: {exc.code().name}: {exc.details()}", flush=True)
        sys.exit(3)
    print("stream ended", flush=True)


if __name__ == "__main__":
    main()
