"""The system in one process: sites as objects that answer through the same SiteWorker as a site process, behind
the same ports as the gRPC sessions (central_server/ports.py), for experiments, tests and the public pretraining."""
