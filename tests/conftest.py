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
