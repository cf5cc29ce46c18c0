"""The adapter directory: its files (adapter_config.json, weights, loraforge.json, model card, base/),
reading one, writing one, and building one from a model (`build.init_adapter`, `build.init_model`)."""
