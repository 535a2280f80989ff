"""The one Pareto-front function: the CLI summary, the Parquet flags and (later) the MLflow tags
all call it."""
from collections.abc import Sequence


def pareto_front(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[int]:
    """Indices (ascending) of the points no other point dominates. A point dominates another when
    it is at least as good in every objective and strictly better in one; `maximize[j]` says which
    way objective j is better. Duplicates of a front point are all on the front."""
    sign = [1.0 if m else -1.0 for m in maximize]
    pts = [tuple(s * float(v) for s, v in zip(sign, p)) for p in points]  # now larger is better

    def dominates(a, b):
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [i for i, p in enumerate(pts) if not any(dominates(q, p) for q in pts)]
