"""Model cards that measure mpopt_hf's memory knobs on real-size architectures (issue #15).

`architectures` builds the models, `ablation` the knob-ablation card, `memory_figure` the seed's
minimum-peak figure, `card` renders and checks Hugging Face model cards from their results.
"""
