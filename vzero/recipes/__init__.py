"""Recipes built on the core: supervised fine-tuning (`sft`) and the controlled toy reproduction (`toy`); `commands`
mounts `vzero recipe ...` on the project CLI. Import the submodules directly; this package imports nothing heavy.
"""
