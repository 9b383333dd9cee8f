"""Online retraining of a CLIP classifier over a stream of corrupted domains, under a memory budget.

    accelerate launch recipes/clip_cls_online.py            # offline default: tiny CLIP, digits -> 5 corruptions
    python recipes/clip_cls_online.py --baseline none       # the source model, never adapted
    python recipes/clip_cls_online.py --model openai/clip-vit-base-patch32 --dataset cifar10-c --data_dir DIR

Every flag: --help. The logic lives in clip_online.run.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from clip_online.run import main  # noqa: E402

if __name__ == "__main__":
    main()
