"""Whether a query runs distributed and with which settings (queries/distribution.py), and
the profile settings that decide it."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from pclease_service.config import DistributedSettings, Profile, Settings
from pclease_service.errors import InvalidInput
from pclease_service.queries.distribution import resolve


def profile(cluster_size: int = 4, **cloud: Any) -> Profile:
    return Profile(name="big", cpus=2, memory_gb=4, cluster_size=cluster_size, polars_cloud=cloud)


def run(requested: Any, p: Profile | None, *, engine: str = "auto") -> Any:
    return resolve(requested, p, backend="polars_cloud", backend_distributes=True, engine=engine)


def test_a_multi_node_profile_runs_queries_distributed_unless_they_say_otherwise() -> None:
    assert run(None, profile()) == DistributedSettings()
    assert run(False, profile()) is None
    assert run(None, profile(cluster_size=1)) is None
    assert run(None, profile(scaling_mode="single-node")) is None
    assert run(True, profile(scaling_mode="single-node")) == DistributedSettings()


def test_a_querys_settings_win_over_the_profiles_defaults_field_by_field() -> None:
    p = profile(distributed={"max_workers": 3, "shuffle_format": "ipc"})
    assert run(True, p) == DistributedSettings(max_workers=3, shuffle_format="ipc")
    asked = DistributedSettings(shuffle_format="parquet", min_workers=2)
    assert run(asked, p) == DistributedSettings(
        max_workers=3, shuffle_format="parquet", min_workers=2
    )
    # An explicit default value is a choice too: it overrides the profile's.
    assert run(DistributedSettings(shuffle_format="auto"), p) == DistributedSettings(max_workers=3)


@pytest.mark.parametrize(
    ("requested", "p", "engine", "says"),
    [
        (True, profile(cluster_size=1), "auto", "cluster_size = 1"),
        (DistributedSettings(), profile(cluster_size=1), "auto", "cannot run distributed"),
        (True, profile(), "in-memory", "engine 'in-memory'"),
        (DistributedSettings(min_workers=5), profile(), "auto", "min_workers = 5 is more than"),
        (DistributedSettings(max_workers=9), profile(), "auto", "cluster_size of 4"),
        (True, None, "auto", "no longer configured"),
        (
            DistributedSettings(min_workers=3),
            profile(distributed={"max_workers": 2}),
            "auto",
            "min_workers (3) must not exceed max_workers (2)",
        ),
    ],
)
def test_what_cannot_run_is_refused_with_what_to_do(
    requested: Any, p: Profile | None, engine: str, says: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        run(requested, p, engine=engine)
    assert says in caught.value.message


def test_a_backend_that_cannot_distribute_refuses_only_queries_that_ask() -> None:
    def local(requested: Any) -> Any:
        return resolve(
            requested, profile(), backend="local", backend_distributes=False, engine="auto"
        )

    assert local(None) is None
    assert local(False) is None
    with pytest.raises(InvalidInput, match="the local backend runs every query on one node"):
        local(True)


def test_settings_that_contradict_themselves_are_refused() -> None:
    with pytest.raises(ValidationError, match="only applies to shuffle_compression = 'zstd'"):
        DistributedSettings(shuffle_compression="lz4", shuffle_compression_level=3)
    with pytest.raises(ValidationError, match="must not exceed max_workers"):
        DistributedSettings(min_workers=3, max_workers=2)
    with pytest.raises(ValidationError):
        DistributedSettings.model_validate({"min_workers": "2"})  # strict: no strings


@pytest.mark.parametrize(
    ("cloud", "says"),
    [
        ({"scaling_mode": "distributed"}, "needs cluster_size > 1"),
        ({"distributed": {"max_workers": 1}}, "only applies to profiles with cluster_size > 1"),
    ],
)
def test_a_single_node_profile_cannot_configure_distribution(
    cloud: dict[str, Any], says: str
) -> None:
    with pytest.raises(ValidationError, match=says):
        profile(cluster_size=1, **cloud)


def test_profile_defaults_must_fit_the_cluster() -> None:
    with pytest.raises(ValidationError, match="max_workers = 5 is more than"):
        profile(cluster_size=4, distributed={"max_workers": 5})


@pytest.mark.parametrize(
    ("backend", "extra", "says"),
    [
        ("local", {"cluster_size": 2}, "cluster_size > 1 needs backend = 'polars_cloud'"),
        ("local", {"storage_gb": 10}, "storage_gb only applies to backend = 'polars_cloud'"),
        ("local", {"workspace": "ws"}, "workspace only applies"),
        ("local", {"instance_type": "m7i.large"}, "instance_type only applies"),
        ("local", {"polars_cloud": {"idle_timeout_mins": 20}}, "polars_cloud options only"),
        ("polars_cloud", {"local": {"boot_delay_s": 1}}, "local options only apply"),
    ],
)
def test_profile_settings_a_backend_would_ignore_are_refused(
    backend: str, extra: dict[str, Any], says: str
) -> None:
    shape = {"cpus": 1, "memory_gb": 1, "workspace": "ws"} if backend != "local" else {}
    with pytest.raises(ValidationError, match=says):
        Settings(backend=backend, profiles={"p": {"cpus": 1, "memory_gb": 1, **shape, **extra}})


def test_the_memory_backend_takes_any_profile_it_runs_nothing_anyway() -> None:
    settings = Settings(
        backend="memory", profiles={"p": {"cpus": 1, "memory_gb": 1, "cluster_size": 3}}
    )
    assert settings.profiles["p"].cluster_size == 3
