"""A CNN on synthetic images, written against DeepSpeed's documented API only.

Usage: python cnn_synthetic.py OUT.json [--deepspeed_config ds.json]; writes the losses to OUT.json.
Runs unchanged with `import deepspeed` being DeepSpeed or ds_all.
"""

import argparse
import json
import sys

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class Images(torch.utils.data.Dataset):
    def __init__(self, n=256):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.y = (self.x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (
            self.x[:, 0].mean(dim=(1, 2)) > 0
        ).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--local_rank", type=int, default=-1)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()
    config = {
        "train_batch_size": 32,
        "gradient_accumulation_steps": 2,
        "steps_per_print": 5,
        "optimizer": {
            "type": "Adam",
            "params": {
                "lr": 0.01,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": 0.0,
                "torch_adam": True,
            },
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0,
                "warmup_max_lr": 0.01,
                "warmup_num_steps": 3,
                "total_num_steps": 20,
                "warmup_type": "linear",
            },
        },
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 1},
    }
    torch.manual_seed(0)
    net = Net()
    engine, optimizer, loader, scheduler = deepspeed.initialize(
        args=args,
        model=net,
        model_parameters=net.parameters(),
        training_data=Images(),
        config=config,
    )
    losses = []
    for _epoch in range(2):
        for x, y in loader:
            x, y = x.to(engine.device), y.to(engine.device)
            loss = F.cross_entropy(engine(x), y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    with open(args.out, "w") as f:
        json.dump(
            {"losses": losses, "lr": scheduler.get_last_lr(), "steps": engine.global_steps}, f
        )


if __name__ == "__main__":
    sys.exit(main())
