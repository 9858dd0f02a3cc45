"""FedAvg and weight-transfer baselines on Flower, for asyndgan's bandwidth benchmark."""
