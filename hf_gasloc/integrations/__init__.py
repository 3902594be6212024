"""Where GASLoC meets the Hugging Face ecosystem: the Trainer callback, the Accelerate plugin,
the ``--gasloc_*`` flags, and what a training script needs around them (local workers, recipes,
checkpoints to resume from, text data packed into blocks)."""

from .arguments import GASLoCArguments
from .data import data_files_builder, load_text_dataset, pack_into_blocks
from .launch import run_local_workers_if_alone
from .plugin import GASLoCPlugin
from .recipes import Recipe, load_recipe
from ..state.checkpoint import newest_complete_checkpoint
from .trainer import GASLoCCallback

__all__ = ["GASLoCArguments", "GASLoCCallback", "GASLoCPlugin", "Recipe", "data_files_builder",
           "load_recipe",
           "load_text_dataset", "newest_complete_checkpoint", "pack_into_blocks",
           "run_local_workers_if_alone"]
