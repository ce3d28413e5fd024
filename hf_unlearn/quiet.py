"""Third-party warnings that tell a user of the `hf-unlearn` commands nothing they can act on, kept off their
terminal. Installed by the command-line entry point only (`cli.main`), never on import: a program that uses
the library keeps every warning."""

from __future__ import annotations

import warnings

# (category, regular expression matched at the start of the message), each exactly one known warning:
NOISE = (
    # transformers 5.x: its own Trainer calls the deprecated alias (the user called neither).
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated and will be removed in v6\. "),
    (
        FutureWarning,
        r"`gradient_checkpointing` is deprecated and will be removed in v6\. Use `activation_checkpointing`",
    ),
    # peft, loading an adapter onto a local model directory without config.json (the demo's GGUF model).
    (UserWarning, r"Could not find a config file in .* - will assume that the vocabulary was not modified\."),
    # torch's DataLoader under the Trainer's default dataloader_pin_memory=True on a machine without a GPU.
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
)


def hide_uninformative_warnings() -> None:
    """Ignore exactly the warnings of `NOISE` (all four are `warnings.warn` calls; none goes through logging)
    for the rest of the process; every other warning is shown as before."""
    for category, message in NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
