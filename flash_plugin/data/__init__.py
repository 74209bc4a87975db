"""Dataset loaders: Fashion-MNIST (IDX files) and image folders."""

from flash_plugin.data.fashion_mnist import FashionMNISTNotFound, find_fashion_mnist, load_fashion_mnist, write_idx
from flash_plugin.data.image_folder import list_images, load_image_folder

__all__ = ["FashionMNISTNotFound", "find_fashion_mnist", "list_images", "load_fashion_mnist", "load_image_folder", "write_idx"]
