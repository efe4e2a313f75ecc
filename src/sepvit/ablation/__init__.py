"""The ablation study of SepViT's parts: tasks generated from the bundled digits."""

from sepvit.ablation.tasks import TaskSpec, TaskSplit, generate_split, write_image_folder

__all__ = ["TaskSpec", "TaskSplit", "generate_split", "write_image_folder"]
