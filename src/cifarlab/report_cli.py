"""Placeholder: filled in by its owner."""


def add_commands(sub, fmt, data_dir_arg) -> None:
    pass
