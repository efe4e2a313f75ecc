"""Dense prediction on our backbones: RetinaNet and Mask R-CNN (torchvision), Semantic FPN and UperNet.

``sepvit detect`` and ``sepvit segment`` train, evaluate and predict with them (see docs/dense.md).
"""
