"""GPT-Neo retrained online as the text domain shifts: ``recipes/gpt_neo_lm_online.py``.

    python recipes/gpt_neo_lm_online.py     # offline: stdlib code -> its docstrings/comments -> package licences/docs

``lm_online.run.main`` is the recipe; ``lm_online.text`` reads the offline domains, ``lm_online.data`` makes the
tokenizer, the token blocks and the tasks, ``lm_online.modeling`` the models and the metric (perplexity).
"""

from __future__ import annotations

from .data import DataArguments, TextTask, load_domains
from .modeling import (
           GPT_NEO_125M,
           GPT_NEO_125M_ID,
           TINY,
           ModelArguments,
           build_model,
           perplexity,
)
from .text import OFFLINE_DOMAINS

__all__ = ["GPT_NEO_125M", "GPT_NEO_125M_ID", "OFFLINE_DOMAINS", "TINY", "DataArguments", "ModelArguments",
           "TextTask", "build_model", "load_domains", "perplexity"]
