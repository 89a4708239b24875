"""What the tests share, one module per kind (tests import them as ``helpers.<module>``: pytest puts tests/ on
``sys.path``; a test's subprocess gets it from ``processes.revcol_env(..., tests_on_path=True)``).

``models``
    The tiny RevCol every test builds (``TINY_CONFIG``, ``TINY_SPEC``), nets with non-trivial weights, inputs, the
    tiny timm classifier, per-tensor gradient assertions.
``checkpoints``
    Assertions on weights and on loading them: the same weights, a refused load that changes nothing, a clear error.
``yamls``
    Tiny Ultralytics model YAMLs (text, no Ultralytics import) on the tiny backbone, per task.
``plugin``
    Ultralytics objects for the plug-in's tests: the shipped RT-DETR config's dict, trainers without a run, users'
    trainers (importable by module path, as Ultralytics' DDP worker imports them).
``training``
    Tiny models of every task trained for an epoch (conftest's ``trained`` fixture), and their ``best.pt`` run in
    fresh processes.
``task_data``
    Small synthetic datasets in Ultralytics' formats for the segment, pose, OBB, classify, semantic and depth tasks.
``server``
    A local weights server on 127.0.0.1, offline weights for a test, a published file in the authors' layout.
``processes``
    Subprocesses: their environment (``revcol_env``), free ports, running as another user.
``design_reference``
    The network of docs/design.md written independently of ``revcol``: the core tests' oracle.
``fsdp_worker``
    A script: one ``torchrun`` rank of test_fsdp.py.
``timm_contract``
    A script, not part of the suite: timm's own model tests run on the RevCol models.
``_netguard/sitecustomize.py``
    Logs a subprocess's network attempts (``revcol_env`` puts its folder on PYTHONPATH).
"""
