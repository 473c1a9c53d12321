"""Adapter methods: one module (or package) per method, each registering itself by kind.

Importing this package imports every method module, which fills :mod:`.registry`. A new method
adds its import here (see README, "Adding a method").
"""

from badit_exp.methods import (  # noqa: F401
    badit,
    gainlora,
    lori,
    moe,
    mtl_lora,
    mtlora,
    o_lora,
    peft_lora,
    registry,  # noqa: F401
)
