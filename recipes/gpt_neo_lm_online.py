"""Retraining a causal language model (GPT-Neo) over a stream of text domains under a memory budget; metric:
perplexity (lower is better).

    python recipes/gpt_neo_lm_online.py               # offline default: tiny GPT-Neo, stdlib code -> docs -> licences
    python recipes/gpt_neo_lm_online.py --baseline fixed --fixed_config mb16/f0.5/ckpt2/fp32
    accelerate launch recipes/gpt_neo_lm_online.py --model EleutherAI/gpt-neo-125m --dataset DIR_A DIR_B --budget_mib 4096
    python recipes/gpt_neo_lm_online.py --model EleutherAI/gpt-neo-125m --random_init true --max_steps 4  # no download

Every flag: --help. The logic lives in lm_online.run.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from lm_online.run import main  # noqa: E402

if __name__ == "__main__":
    main()
