"""loraforge: LoRA initialisations for RL with verifiable rewards, as ready-to-train PEFT adapters.

    from loraforge import InitConfig, init_adapter, init_model, save_init
    init_adapter("HuggingFaceTB/SmolLM2-135M-Instruct", "out/rlpo", InitConfig(method="rlpo", r=32))
    save_init(init_model(model, InitConfig(method="pissa", r=32)), "out/pissa")  # a model in memory

Heavy modules (transformers, peft) are imported only when a function needs them.
"""

from loraforge.core.errors import LoraforgeError

__version__ = "0.3.1"
__all__ = ["LoraforgeError", "InitConfig", "init_adapter", "init_model", "save_init", "METHODS"]


def __getattr__(name):
    if name == "InitConfig":
        from loraforge.inits.config import InitConfig

        return InitConfig
    if name == "init_adapter":
        from loraforge.adapters.build import init_adapter

        return init_adapter
    if name in ("init_model", "save_init"):
        from loraforge.adapters import in_memory

        return getattr(in_memory, name)
    if name == "METHODS":
        from loraforge.inits.methods import METHODS

        return METHODS
    raise AttributeError(f"module 'loraforge' has no attribute {name!r}")
