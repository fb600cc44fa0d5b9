"""Peak CPU memory of one profiled region, from the torch profiler's allocation events.

Shared by bench_train.py and bench_memory.py: run the work under
``profile(activities=[ProfilerActivity.CPU], profile_memory=True)`` with the measured part
inside ``record_function(marker)``, then ``peak_in_window(prof, marker)``.
"""


def peak_in_window(prof, marker: str) -> int:
    """Most bytes allocated above the level at the start of the region named `marker`.

    The level is the running sum of the CPU allocator's allocation (+) and free (-) events.
    Frees of blocks allocated before profiling are not reported, which would overstate the
    peak: allocate what the region may free inside the profiled span, before the region."""
    from torch._C._profiler import _EventType

    events, window = [], None
    todo = list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        e = todo.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        elif e.name == marker:
            window = (e.start_time_ns, e.end_time_ns)
        todo.extend(e.children)
    if window is None:
        raise RuntimeError(f"profiler lost the {marker} marker")
    level = start = peak = 0
    for t, size in sorted(events):
        level += size
        if t < window[0]:
            start = level
        elif t <= window[1]:
            peak = max(peak, level - start)
    return peak
