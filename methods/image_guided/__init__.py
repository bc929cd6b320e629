"""The image-guided pre-training method (Janda et al., "Self-Supervised Pre-Training of 3D Point
Cloud Networks with Image Data"): registered as ``image_guided`` (methods.image_guided.method).

Modules: ``resunet`` (2D network), ``augment2d`` (views with source coordinates), ``losses``
(InfoNCE), ``stage1`` / ``stage2`` (the two trainings), ``method`` (the registered class),
``visualize`` (the paper's Figure 2 feature pictures). Importing this package imports no torch.
"""
