"""What a knob does to a model: its ordered blocks and stem (`blocks`, with the families' adapters in
`block_adapters`), and applying or switching a `MemoryConfig` on it (`knobs`: freezing, checkpointing, precision;
`selective_checkpoint` for the selective policy). Nothing here knows a Trainer."""
