"""Model directories: random-init Qwen-VL builds (`tiny`), their shapes (`presets`), a locally trained
tokenizer (`tokenizer`), loading users' directories (`loading`) and the `vzero model` CLI (`commands`).

Import the submodules directly; this package imports nothing heavy on purpose (the CLI imports
`commands` at startup).
"""
