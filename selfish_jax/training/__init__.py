"""Training: the sparse-training core (``core``), the epoch loop every task runs
(``loop``), the two tasks (``train``: language modelling, ``classify``), and
their pieces: pure steps, checkpoints, metrics, devices, preemption, workdirs."""
