"""The adapter directory: its files (adapter_config.json, weights, loraforge.json, model card, base/),
reading one, writing one, and building one from a model (`build.init_adapter`; `in_memory.init_model`,
`in_memory.save_init` for a model in memory)."""
