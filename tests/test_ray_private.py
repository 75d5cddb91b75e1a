"""The Ray internals the project relies on (distributed/ray_private.py) are where it expects them: a Ray upgrade
that moves one fails here, by name, instead of in a user's run."""
import logging


def test_ray_trains_start_up_bound_is_where_the_project_sets_it():
    from distributed_ebm.distributed.ray_private import train_start_timeout_env, train_startup_errors

    assert train_start_timeout_env() == "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
    errors = train_startup_errors()
    assert len(errors) == 2 and all(issubclass(e, Exception) for e in errors)


def test_the_parquet_footer_actors_variable_is_the_one_ray_data_reads():
    import inspect

    from ray.data._internal.datasource_v2.formats.parquet import footer_file_indexer

    from distributed_ebm.distributed.ray_private import PARQUET_FOOTER_ACTORS_ENV

    assert f'"{PARQUET_FOOTER_ACTORS_ENV}"' in inspect.getsource(footer_file_indexer)


def test_ray_datas_progress_logger_exists():
    import ray.data  # noqa: F401 - registers its loggers

    from distributed_ebm.distributed.ray_private import DATA_PROGRESS_LOGGER

    assert DATA_PROGRESS_LOGGER in logging.root.manager.loggerDict


def test_the_logs_folder_from_the_public_runtime_context_is_rays_own(ray_local):
    from ray._private.worker import _global_node

    from distributed_ebm.distributed.ray_private import logs_dir

    assert logs_dir() == _global_node.get_logs_dir_path()


def test_credentials_do_not_travel_in_the_runtime_env():
    from distributed_ebm.distributed.cluster import secret

    assert all(secret(k) for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
                                   "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"))
    assert not any(secret(k) for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI",
                                       "MLFLOW_S3_ENDPOINT_URL", "DEBM_SHARED"))


def test_lost_errors_are_recognized_by_class_and_through_rays_stand_in():
    import ray.exceptions

    from distributed_ebm.distributed.attack import LOST, lost

    assert all(hasattr(ray.exceptions, n) for n in LOST)  # every name is a public class
    died = ray.exceptions.ActorDiedError()
    assert lost(died) and lost(ray.exceptions.RayTaskError("f", "tb", died).as_instanceof_cause())
    wrapped = ValueError("outer")
    wrapped.__cause__ = ray.exceptions.NodeDiedError("node gone")
    assert lost(wrapped) and not lost(ValueError("bad data")) and not lost(None)
    stand_in = ray.exceptions.UnserializableException("ray.exceptions.ActorDiedError: The actor died")
    assert lost(stand_in) and not lost(ray.exceptions.UnserializableException("KeyError: 'x'"))


def test_the_error_chain_follows_every_wrapped_error_once():
    import ray.exceptions

    from distributed_ebm.distributed.attack import data_error, error_chain, lost
    from distributed_ebm.store.data import DataError

    died, bad = ray.exceptions.ActorDiedError(), DataError("row 3 is not an image\nretry advice")
    outer = ValueError("outer")
    outer.__cause__, outer.__context__ = KeyError("cause"), died  # a lost actor in the context, not the cause
    task = ray.exceptions.RayTaskError("f", "tb", bad)  # Ray's task error carries its error as `cause`
    died.__context__ = task
    task.__context__ = outer  # a cycle ends
    chain = list(error_chain(outer))
    assert [type(e).__name__ for e in chain] == ["ValueError", "KeyError", "ActorDiedError", "RayTaskError",
                                                  "DataError"]
    assert lost(outer) and str(data_error(outer)) == "row 3 is not an image" and data_error(KeyError()) is None


def test_no_other_module_reaches_into_ray_internals():
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "distributed_ebm"
    reaching = [str(p.relative_to(package)) for p in package.rglob("*.py") if p.name != "ray_private.py"
                and any(hook in p.read_text() for hook in ("ray._private", "._internal", "UnserializableException"))]
    assert not reaching, reaching
