"""vmem's benchmark suite (outside the wheel): ``python -m bench --help``.

Runs ResNet/VGG training under a device budget with plain PyTorch, the peers PyTorch users
have (``save_on_cpu``, ``checkpoint_sequential``, torchtune's offloader when it imports) and
vmem's policies; each run in a fresh subprocess (:mod:`bench.worker`), results as JSON lines,
a markdown table and plots (:mod:`bench.report`).
"""
