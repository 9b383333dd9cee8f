"""Retraining a small CNN over a stream of domains under a memory budget: the MPOptimizer seed's experiment.

    python recipes/cnn_retrain.py                          # offline default: resnet18 (x0.25), digits -> mnist-m, svhn, usps
    python recipes/cnn_retrain.py --hyperparameters mb16/f0.5/ckpt2/fp32 --epoch 1 --lr 1e-3
    accelerate launch recipes/cnn_retrain.py --dataset cifar10-c --data_dir DIR --model resnet50 --task 5 --budget_mib 2048

The seed's flags (--dataset --model --hyperparameters --task --epoch --lr) map onto TrainingArguments /
MPOptArguments; every flag: --help. The logic lives in cnn_online.run.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from cnn_online.run import main  # noqa: E402

if __name__ == "__main__":
    main()
