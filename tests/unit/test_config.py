"""Configuration: the TOML file, environment overrides, and one message per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from pclease_service.config import BackendKind, ConfigError, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pclease.toml"
    path.write_text(text)
    return path


def test_reads_profiles_and_defaults(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        """
backend = "local"
[profiles.small]
cpus = 2
memory_gb = 4
hourly_cost = 0.5
local = { boot_delay_s = 1.5 }
""",
    )
    settings = load_settings(config)
    small = settings.profiles["small"]
    assert small.name == "small"
    assert (small.cpus, small.memory_gb, small.hourly_cost) == (2, 4.0, 0.5)
    assert small.local.boot_delay_s == 1.5
    assert settings.backend is BackendKind.LOCAL
    assert settings.resolved_database_url.startswith("sqlite:///")


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path, "lease_ttl_s = 60\n[profiles.small]\ncpus = 1\nmemory_gb = 1\n")
    monkeypatch.setenv("PCLEASE_LEASE_TTL_S", "90")
    monkeypatch.setenv("PCLEASE_DATABASE_URL", "postgresql+psycopg://u:pw@db/pclease")
    settings = load_settings(config)
    assert settings.lease_ttl_s == 90
    assert settings.resolved_database_url == "postgresql+psycopg://u:pw@db/pclease"


def test_every_problem_is_reported_with_its_key(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        """
backend = "kubernetes"
lease_ttl_s = -1
colour = "blue"
[profiles.small]
cpus = 0
memory_gb = 1
[profiles.big]
cpus = 1
""",
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    problems = caught.value.problems
    joined = "\n".join(problems)
    assert len(problems) >= 5, joined
    assert any(p.startswith("backend:") and "local" in p for p in problems), joined
    assert any(p.startswith("lease_ttl_s:") for p in problems), joined
    assert any(p.startswith("colour:") and "unknown key" in p for p in problems), joined
    assert any(p.startswith("profiles.small.cpus:") for p in problems), joined
    assert any(p.startswith("profiles.big") and "memory_gb" in p for p in problems), joined


def test_inconsistent_timings_say_what_to_change(tmp_path: Path) -> None:
    config = write(tmp_path, "lease_ttl_s = 10\nlease_ttl_min_s = 20\nreconcile_interval_s = 30\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    joined = "\n".join(caught.value.problems)
    assert "lease_ttl_s must lie between lease_ttl_min_s and lease_ttl_max_s" in joined
    assert "reconcile_interval_s must be at most half of lease_ttl_min_s" in joined


def test_a_heartbeat_batch_longer_than_a_quarter_of_the_shortest_ttl_is_refused(
    tmp_path: Path,
) -> None:
    config = write(tmp_path, "lease_ttl_min_s = 4\nheartbeat_flush_s = 1.5\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    joined = "\n".join(caught.value.problems)
    assert "heartbeat_flush_s must be at most a quarter of lease_ttl_min_s" in joined
    for bad in ("-1", "6", '"soon"'):
        with pytest.raises(ConfigError, match=r"heartbeat_flush_s:"):
            load_settings(write(tmp_path, f"heartbeat_flush_s = {bad}\n"))
    assert load_settings(write(tmp_path, "heartbeat_flush_s = 0\n")).heartbeat_flush_s == 0


def test_local_backend_needs_cpus_and_memory(tmp_path: Path) -> None:
    config = write(tmp_path, '[profiles.gpu]\ninstance_type = "p4d.24xlarge"\n')
    with pytest.raises(ConfigError, match=r"profiles\.gpu: the local backend needs cpus"):
        load_settings(config)
    cloud = write(
        tmp_path,
        'backend = "polars_cloud"\n'
        '[profiles.gpu]\ninstance_type = "p4d.24xlarge"\nworkspace = "ws"\n',
    )
    assert load_settings(cloud).profiles["gpu"].instance_type == "p4d.24xlarge"


def test_bad_profile_names_and_missing_files(tmp_path: Path) -> None:
    config = write(tmp_path, '[profiles."Big One"]\ncpus = 1\nmemory_gb = 1\n')
    with pytest.raises(ConfigError, match="a profile name is 1-63 lowercase"):
        load_settings(config)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
    broken = write(tmp_path, "[profiles.small\ncpus = 1\n")
    with pytest.raises(ConfigError, match="cannot parse the config file"):
        load_settings(broken)


def test_passwords_in_urls_are_not_echoed(tmp_path: Path) -> None:
    config = write(tmp_path, "database_url = 42\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert "database_url" in str(caught.value)
    secret = write(tmp_path, 'database_url = ["postgresql://u:hunter2@db/x"]\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(secret)
    assert "hunter2" not in str(caught.value)


def test_quotas_are_read_per_token_with_a_default(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        """
[profiles.large]
cpus = 8
memory_gb = 32
hourly_cost = 2.5

[quotas.default]
max_live_leases = 20

[quotas.tokens.team-a]
max_live_leases = 5
max_instance_hours_per_day = 12.5

[quotas.tokens.team-a.profiles.large]
max_live_contexts = 1
monthly_budget = 400
monthly_budget_hard = false

[quotas.tokens.ops]
""",
    )
    quotas = load_settings(config).quotas
    team = quotas.for_token("team-a")
    assert (team.max_live_leases, team.max_instance_hours_per_day) == (5, 12.5)
    large = team.profiles["large"]
    assert (large.max_live_contexts, large.monthly_budget, large.monthly_budget_hard) == (
        1,
        400.0,
        False,
    )
    # A token's own entry replaces the default entirely; an empty one has no limits.
    assert quotas.for_token("ops").unlimited
    assert quotas.for_token("anyone-else").max_live_leases == 20


def test_quota_problems_say_what_to_change(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        """
[profiles.free]
cpus = 1
memory_gb = 1

[quotas.default]
max_live_leases = -1

[quotas.tokens.team-a]
max_live_lease = 3

[quotas.tokens.team-a.profiles.larg]
max_live_contexts = 1

[quotas.tokens.team-b.profiles.free]
monthly_budget = 10
""",
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    problems = caught.value.problems
    assert (
        "quotas.default.max_live_leases: Input should be greater than or equal to 0 (got -1)"
        in problems
    )
    assert (
        "quotas.tokens.team-a.max_live_lease: unknown key; check its spelling against "
        "docs/configuration.md (got 3)" in problems
    )
    # Checked against the profiles once every key is known.
    config.write_text(
        config.read_text()
        .replace("max_live_leases = -1", "")
        .replace("max_live_lease = 3", "max_live_leases = 3")
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert caught.value.problems == [
        "quotas.tokens.team-a.profiles.larg: no profile 'larg' is configured (configured "
        "profiles: free)",
        "quotas.tokens.team-b.profiles.free.monthly_budget: profile 'free' has hourly_cost "
        "= 0, so it never spends anything: set profiles.free.hourly_cost, or remove the budget",
    ]
