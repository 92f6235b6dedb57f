"""Fixtures shared by several test files."""

import pytest


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node Slurm cluster on localhost (tests/slurm_cluster.py) for `slurm` tests;
    started once per session, its daemons stopped by pid at the end."""
    from slurm_cluster import SlurmCluster

    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """A real two-node Slurm cluster, every daemon on a host of its own made of namespaces
    (tests/slurm_nodes.py), for one test module; skips with the reason where namespaces cannot be
    made (not root). Stopped, namespaces and links removed, when the module is done."""
    from slurm_nodes import TwoNodeCluster, namespaces_unavailable

    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    cluster = TwoNodeCluster(tmp_path_factory.mktemp("slurm-two-nodes")).start()
    yield cluster
    cluster.stop()


def pytest_collection_modifyitems(config, items):
    """The `scale` tier (full-size paper presets, minutes per test) runs only when a -m expression
    names it (`./launch test -m scale`); any other selection, `-m "not slurm"` included, leaves it out."""
    if "scale" in (config.option.markexpr or ""):
        return
    scale = [item for item in items if item.get_closest_marker("scale")]
    if scale:
        config.hook.pytest_deselected(items=scale)
        items[:] = [item for item in items if not item.get_closest_marker("scale")]
