"""A service stores every few seconds: only the stream-state rows that changed since the last store are rewritten (at
100,000 streams, rewriting all of them is the cost of a commit), and the rows then equal a store written from
scratch."""

from sqlalchemy import select

from ingest import load
from vigil.persist import store_results
from vigil.pipeline import REFERENCE_TYPES, Pipeline, _arrival_order
from vigil.settings import load_settings
from vigil.simulator import simulate
from vigil.store import StreamStateRow, session_factory, upgrade


def _rows(url: str) -> dict:
    factory = session_factory(url)
    with factory() as s:
        rows = {(r.model, r.model_version, r.metric, r.site, r.subgroup): (r.id, r.status, r.baseline_n, r.n,
                                                                            r.statistic, r.state)
                for r in s.scalars(select(StreamStateRow))}
    factory.kw["bind"].dispose()
    return rows


def test_only_changed_stream_states_are_rewritten_and_end_equal_to_a_full_store(tmp_path):
    simulate("stable", tmp_path / "feed", seed=9, days=75, volume=0.3)
    settings = load_settings()
    p = Pipeline(settings)
    loaded = load([tmp_path / "feed"], p.decoder)
    events = sorted(((pos, r) for pos, r in loaded.records if not isinstance(r, REFERENCE_TYPES)), key=_arrival_order)
    p.process([(pos, r) for pos, r in loaded.records if isinstance(r, REFERENCE_TYPES)])
    url = f"sqlite:///{tmp_path / 'incremental.db'}"
    upgrade(url)
    factory = session_factory(url)
    cut = len(events) // 2
    p.process(events[:cut])
    with factory() as s, s.begin():
        store_results(s, p.result, settings.routing)
    p.result.mark_stored()
    before = _rows(url)
    p.process(events[cut:cut + 20])  # a few seconds of feed: they touch a few of the streams
    changed = {(s.key.model, s.key.version, s.key.metric, s.key.site, s.key.subgroup)
               for m in p.result.monitors() for s in m.streams.values() if not s.stored}
    assert 0 < len(changed) < 0.5 * len(before)
    with factory() as s, s.begin():
        store_results(s, p.result, settings.routing)
    factory.kw["bind"].dispose()
    after = _rows(url)
    assert set(after) == set(before) | changed
    assert all(after[k][0] == before[k][0] for k in before if k not in changed)  # untouched rows not rewritten

    p.result.mark_stored()
    p.process(events[cut + 20:])
    with factory() as s, s.begin():
        store_results(s, p.result, settings.routing)
    factory.kw["bind"].dispose()
    after = _rows(url)
    full = f"sqlite:///{tmp_path / 'full.db'}"
    upgrade(full)
    factory = session_factory(full)
    with factory() as s, s.begin():
        store_results(s, p.result, settings.routing, incremental=False)
    factory.kw["bind"].dispose()
    assert {k: v[1:] for k, v in _rows(full).items()} == {k: v[1:] for k, v in after.items()}
