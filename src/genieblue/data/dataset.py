"""Training samples of a `DataMixture`, materialised lazily: every record is measured up front
(its token count, exact or estimated, from its text and its images' headers: enough to pack; see
`lengths`), and encoded, pixels and all, only when a step asks for it, so memory stays bounded
however large the data files are."""

from __future__ import annotations

from collections.abc import Sequence

from ..model.cache import cache_dir
from .lengths import LengthMeasure
from .processor import GenieBlueProcessor, Sample
from .records import BadRecord, DataMixture, Source
from .scans import ScanCache


class MixtureSamples(Sequence):
    """`samples[i]` encodes position i of the mixture (raising `BadRecord` / `ImageError` /
    `ValueError` for a record that fails only now, e.g. an image whose pixels are corrupt);
    `length(i)` is its token count, known without encoding, exact where `exact(i)` and an
    estimate otherwise."""

    def __init__(self, mixture: DataMixture, processor: GenieBlueProcessor):
        self.mixture = mixture
        self.processor = processor
        self.failed: list[BadRecord] = []
        self._failed_ids: set[str] = set()

    @classmethod
    def from_sources(
        cls,
        sources: list[Source],
        processor: GenieBlueProcessor,
        seed: int = 0,
        on_record=None,
        scans: bool = True,
        share: tuple[int, int] = (0, 1),
    ) -> MixtureSamples:
        """The samples of `sources` mixed by `seed`; with `scans`, each file's scan is kept in
        `cache_dir()/scans` (see `scans`) and read back where the same bytes were measured alike, and
        `share` (part, parts) splits a first read among the processes of a machine (`ScanCache`)."""
        measure = LengthMeasure(processor)
        cache = ScanCache(cache_dir() / "scans", measure.key, *share) if scans else None
        return cls(DataMixture(sources, seed=seed, measure=measure, on_record=on_record, scans=cache), processor)

    def __len__(self) -> int:
        return len(self.mixture)

    def length(self, index: int) -> int:
        return self.mixture.measure(index)

    def exact(self, index: int) -> bool:
        return self.mixture.exact(index)

    @property
    def lengths(self) -> list[int]:
        return [self.mixture.measure(i) for i in range(len(self))]

    def __getitem__(self, index: int) -> Sample:
        sample = self.processor.encode(self.mixture[index])
        if self.exact(index) and len(sample) != self.length(index):  # an image whose header told another tile count
            raise BadRecord(
                sample.id, f"{len(sample)} tokens once decoded, {self.length(index)} from the image headers"
            )
        return sample

    def sample(self, index: int) -> Sample | None:
        """`self[index]`, or None for a record that fails only now; its failure goes to `failed`
        (once per record, however often the mixture repeats it)."""
        try:
            return self[index]
        except ValueError as err:  # BadRecord and ImageError included
            record_id = err.record_id if isinstance(err, BadRecord) else self.mixture[index]["id"]
            if record_id not in self._failed_ids:
                self._failed_ids.add(record_id)
                self.failed.append(err if isinstance(err, BadRecord) else BadRecord(record_id, str(err)))
            return None

    def __iter__(self):
        """The samples that encode, in mixture order."""
        return (s for s in map(self.sample, range(len(self))) if s is not None)
