"""zoomgym: teach multimodal models to look closer.

Three layers, each importing only the ones before it: ``zoomgym.envs`` (Gymnasium environments,
frames, views, datasets) -> ``zoomgym.agents`` (scripted agents, the LMM agent, the rollout engine,
generation backends) -> ``zoomgym.algorithms`` (the maths, GRPO/MGPO, the trainer, configs, the
``zoomgym`` command). This package itself holds only what every layer shares: the `Registry` type
behind every extension point and `lazy_exports` (``zoomgym.registry``).
"""

__version__ = "0.1.0"
