"""Reading the files a dataset is made of: images, decoded the same way for every task."""

from sepvit.data_io.images import ALPHA_BACKGROUND, IMAGE_SUFFIXES, is_image_file, open_image

__all__ = ["ALPHA_BACKGROUND", "IMAGE_SUFFIXES", "is_image_file", "open_image"]
