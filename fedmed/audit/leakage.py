"""Leakage: nothing in a run's ledgers, metrics or logs that points at a patient: file
paths, image file names, patient, accession and national identifiers, DICOM tags,
attributes, UIDs and person names, dates of birth, e-mail addresses, or arrays the size
of an image. Strings are scanned where they sit in the JSON/TOML, so a digest or a
signature is not mistaken for an identifier; a value is also read after its key, so
`"dob": "1980-03-12"` is a date of birth where fedmed's own timestamps are not.

Whoever can write one line into a scanned file must not be able to stall the audit, so
the scan is linear in its input with bounded memory: files are read in bounded pieces;
a line longer than any record fedmed writes is a finding in itself (it could hold an
encoded image) and is scanned as plain text in overlapping windows; the strings of
consecutive records are joined and each pattern runs once over them, so many small
strings cost no more per byte than one long one; and every pattern is written so that
Python's backtracking `re` does bounded work per position (no nested or overlapping
unbounded quantifiers, possessive ones where a run may be long, and a rare literal
first where there is one, with what precedes it checked by a fixed-width lookbehind)."""

from __future__ import annotations

import bisect
import codecs
import json
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import IO, Any

from fedmed.audit.evidence import Evidence, Finding
from fedmed.run.directory import RunDirectory

PIXEL_LIKE = 1024  # numbers in one array: a 32x32 image
SCANNED = (".jsonl", ".json", ".toml", ".md", ".csv", ".log", ".txt")
NOT_EVIDENCE = (RunDirectory.AUDIT, RunDirectory.AUDIT_REPORT)
# Keys whose values are fedmed's own, not a hospital's: the researcher's output folder,
# digests, signatures and key ids.
ALLOWED_KEYS = re.compile(r"^(dir|sig|head|prev|key_id|run|.*_sha256)$")
# fedmed's records are a few KB (an array of PIXEL_LIKE numbers is itself a finding),
# so a line over MAX_LINE bytes is not one of them. MAX_DOCUMENT bounds what is parsed
# whole; a larger .json or .toml is scanned line by line.
MAX_LINE = 1 << 20
MAX_DOCUMENT = 4 << 20
_OVER_LONG = f"over the {MAX_LINE:,} any record of fedmed's takes: it could hold an encoded image"
WINDOW = 1 << 20  # bytes of an over-long line read at a time
OVERLAP = 4096  # characters each window repeats of the last: a match this long is never split
# Check digits are tested in Python, about 1 us each: text built to fail them (a window of
# invalid NHS numbers) would cost seconds per MB, so a pattern gives up on a batch or a
# window after this many failures. An identifier behind that many near-misses is no
# careless leak.
MAX_CHECKS = 256
BATCH = 1 << 16  # characters of strings from consecutive records scanned together
# Between two strings of a batch: no pattern's match can cross it (\x00 ends every run
# a pattern repeats but a path's last part, which \n ends), and \n before a string
# stands for its start (a path's delimiter, a \b).
SEP = "\x00\n"


@dataclass(frozen=True)
class Pattern:
    """One kind of patient data.

    `needs`: lower-case strings of which every match holds one; a substring test costs a
    fraction of a regex pass, so text without any is skipped. `lower`: the regex is
    written for text with A to Z in lower case (a case-insensitive regex runs several
    times slower).
    `valid`: what a regex cannot say (a check digit, a calendar date). `context`: the
    value is also read after its key, for kinds that are identifiers only when named
    so. `back`: characters a match's start is extended over to show it (a file name's
    stem, an address's local part) and `before`: characters of it the regex checks by
    lookbehind only."""

    what: str
    rx: re.Pattern[str]
    needs: tuple[str, ...] = ()
    lower: bool = False
    valid: Callable[[re.Match[str]], bool] | None = None
    context: bool = False
    back: str = ""
    before: int = 0

    def matches(self, where: str, starts: list[int], low: str) -> Iterator[tuple[int, str]]:
        """(string, shown) for the first match in each string of a batch: `where` the
        strings joined with SEP (in lower case if the pattern is `lower`), `starts`
        where each begins, `low` them in lower case, for `needs`."""
        if self.needs and not any(n in low for n in self.needs):
            return
        position, failed = 0, 0
        while (m := self.rx.search(where, position)) is not None:
            string = bisect.bisect_right(starts, m.end() - 1) - 1
            if self.valid is not None and not self.valid(m):
                failed += 1
                if failed == MAX_CHECKS:
                    return
                position = m.end()
                continue
            position = starts[string + 1] if string + 1 < len(starts) else len(where)  # the next string: one finding each
            start, end = (m.start("id"), m.end("id")) if "id" in self.rx.groupindex else (m.start(), m.end())
            start = max(0, start - self.before)
            if self.back:
                stop = max(0, start - 255)
                while start > stop and (where[start - 1] in self.back or where[start - 1].isalnum()):
                    start -= 1
            yield string, where[start:end]


def _digits(text: str) -> list[int]:
    return [int(c) for c in text if c.isdecimal()]


def _nhs(m: re.Match[str]) -> bool:
    """The NHS number's tenth digit is a mod-11 check on the first nine (weights 10 to 2);
    a remainder that asks for check digit 10 is never issued."""
    d = _digits(m.string[m.start() - 3 : m.end()])
    check = 11 - sum(w * x for w, x in zip(range(10, 1, -1), d[:9], strict=True)) % 11
    return check != 10 and check % 11 == d[9]


def _luhn(d: list[int]) -> bool:
    total = sum((2 * x - 9 if x > 4 else 2 * x) if i % 2 == len(d) % 2 else x for i, x in enumerate(d))
    return total % 10 == 0


def _personnummer(m: re.Match[str]) -> bool:
    """Sweden's personnummer (YY)YYMMDD-NNNN (a plus sign past 100 years): a calendar
    date (day + 60 in a coordination number) and a Luhn check over the last ten digits,
    the six or eight digits standing alone."""
    text, sep = m.string, m.start()
    start = sep
    while start > max(0, sep - 9) and text[start - 1].isdecimal():
        start -= 1
    if sep - start not in (6, 8) or (start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_.-")):
        return False
    d = _digits(text[sep - 6 : m.end()])
    month, day = 10 * d[2] + d[3], 10 * d[4] + d[5]
    return 1 <= month <= 12 and (1 <= day <= 31 or 61 <= day <= 91) and _luhn(d)


# Dates of birth: ISO and DICOM (YYYYMMDD) forms, day or month first with - / or ., and
# with the month's name; lower case, as the pattern that uses them.
_Y = r"(?:18|19|20)\d\d"
_M = r"(?:0?[1-9]|1[0-2])"
_D = r"(?:0?[1-9]|[12]\d|3[01])"
_MON = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]{0,6}+\.?"
_DATE = "|".join([
    rf"{_Y}-{_M}-{_D}", rf"{_Y}/{_M}/{_D}", rf"{_Y}\.{_M}\.{_D}",
    rf"{_Y}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])",
    rf"{_D}-{_D}-(?:{_Y}|\d\d)", rf"{_D}/{_D}/(?:{_Y}|\d\d)", rf"{_D}\.{_D}\.(?:{_Y}|\d\d)",
    rf"{_D}(?:st|nd|rd|th)?[\s\-]{{1,2}}+(?:of\s)?{_MON}[\s\-,]{{1,3}}+{_Y}",
    rf"{_MON}\s{{1,2}}+{_D}(?:st|nd|rd|th)?,?\s{{1,2}}+{_Y}",
])
# Not a letter, digit, _ . or - on either side: a number standing alone (not part of a
# version, a float, a date or a run's name), written after a literal in each pattern.
_ALONE_BEFORE = r"(?<![\w.\-])"
_ALONE_AFTER = r"(?![\w\-]|\.\d)"
_NATIONAL = (
    r"ssn|nhs|bsn|nir|cpr|nino|hetu|aadhaar|medicare|personnummer|f[oøØ]dselsnummer|henkil[oöÖ]tunnus"
    r"|social[\s_\-]?(?:security|insurance)|national[\s_\-]?(?:id|identifier|identity|insurance|health)"
    r"|insurance[\s_\-]?(?:no|nr|number)|health[\s_\-]?(?:card|number|insurance)"
)

PATTERNS = [
    Pattern("a file path", re.compile(r"(?:^|[\s\"'=(:])(?:~|[A-Za-z]:)?[\\/](?:[^\s\\/\"']++[\\/])++[^\s\\/\"']*+"), ("/", "\\")),
    Pattern("an image file name", re.compile(r"\.(?<=[\w\-.]\.)(?:dcm|dicom|nii\.gz|nii|mha|mhd|nrrd|png|jpe?g|tiff?|bmp|ima)\b", re.I), back="-._"),
    Pattern("a patient identifier", re.compile(r"\b(?:patient|pat|subject|subj|sub|case|mrn|pid)[\s_\-#:]*+\d{2,}+\b"),
            ("pat", "sub", "case", "mrn", "pid"), lower=True, context=True),
    Pattern("a patient identifier (TCGA barcode)", re.compile(r"tcga-(?<=\btcga-)[a-z0-9]{2}-[a-z0-9]{4}\b"), lower=True),
    Pattern("a patient identifier (BraTS case)", re.compile(r"brats(?<=\bbrats)\d*+[_-]\w*(?<=\d{3})\b"), lower=True),
    Pattern("a DICOM tag", re.compile(r"\(\s*+[0-9A-Fa-f]{4}\s*+,\s*+[0-9A-Fa-f]{4}\s*+\)")),
    Pattern("a DICOM attribute", re.compile(r"\b(?:PatientName|PatientID|PatientBirthDate|PatientSex|PatientAge|StudyInstanceUID|SeriesInstanceUID"
                                            r"|SOPInstanceUID|AccessionNumber|InstitutionName|ReferringPhysicianName|StudyDate)\b"),
            ("patient", "instanceuid", "accessionnumber", "institutionname", "referringphysicianname", "studydate")),
    Pattern("a DICOM UID", re.compile(r"1\.2\.840\.(?<=\b1\.2\.840\.)\d+(?:\.\d+){2,}\b")),
    # PN values: family^given^middle^prefix^suffix, two letters or more before the first ^.
    Pattern("a person's name (DICOM)", re.compile(r"\^(?<=[^\W\d_]{2}\^)\^{0,3}+[^\W\d_]++(?:\^{1,4}+[^\W\d_]++){0,3}+"), back="'-"),
    Pattern("a date of birth", re.compile(
        r"(?:dob(?![a-z])|d\.o\.b|birth|born)[a-z_]{0,16}+[^\w\n(]{0,6}+(?:\(0010,0030\)[^\w\n]{0,6}+)?"
        rf"(?:(?:on|of|is|was|date)[^\w\n]{{1,3}}+){{0,2}}+(?=[\djfmasond])(?P<id>{_DATE})(?!\d)"), ("dob", "d.o.b", "birth", "born"), lower=True, context=True),
    # The US SSA never issues area 000, 666 or 900-999, group 00 or serial 0000.
    Pattern("a national identifier (US SSN)", re.compile(rf"-(?<={_ALONE_BEFORE}(?!000|666|9)\d{{3}}-)(?!00)\d{{2}}-(?!0000)\d{{4}}{_ALONE_AFTER}"), before=3),
    Pattern("a national identifier (NHS number)",
            re.compile(rf"([ \-])(?<={_ALONE_BEFORE}(?<!\d[ \-])\d{{3}}[ \-])\d{{3}}\1\d{{4}}(?![\w\-]|\.\d|[ \-]\d)"), valid=_nhs, before=3),
    Pattern("a national identifier (Swedish personnummer)", re.compile(rf"[-+](?<=\d{{6}}[-+])\d{{4}}{_ALONE_AFTER}"), valid=_personnummer, before=6),
    Pattern("a national identifier", re.compile(
        rf"(?<![a-z])(?:{_NATIONAL})(?:[\s_\-]?(?:no|nr|num|number|id))?(?![a-z\d])[^\w\n]{{0,6}}+(?P<id>\d(?:[ \-]?\d){{7,14}}+){_ALONE_AFTER}"),
            ("ssn", "nhs", "bsn", "nir", "cpr", "nino", "hetu", "aadhaar", "medicare", "personnummer", "dselsnummer", "henkil",
             "social", "national", "insurance", "health"), lower=True, context=True),
    Pattern("an e-mail address", re.compile(r"@(?<=[\w.%+\-]@)(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b"), back="._%+-"),
    Pattern("an accession number", re.compile(
        r"(?:accession(?:[\s_\-]?(?:number|num|nr|no|id))?|(?<![a-z])acc[\s_.\-]{0,2}+(?:number|num|nr|no|#))(?![a-z])[^\w\n]{0,6}+"
        r"(?P<id>(?=[a-z\-]{0,8}+\d)[a-z0-9][a-z0-9\-]{4,23}+)(?![\w\-])"), ("acc",), lower=True, context=True),
]


# The kinds of national identifier known by their format, and the one known only by the
# word before it, which is not reported twice.
_NATIONAL_FORMATS = {i for i, p in enumerate(PATTERNS) if p.what.startswith("a national identifier (")}
_NATIONAL_NAMED = next(i for i, p in enumerate(PATTERNS) if p.what == "a national identifier")


def _strings(value: Any, key: str = "") -> Iterator[tuple[str | None, Any]]:
    """(key, leaf) pairs, each dict key a leaf of its own under None; lists of numbers
    come whole, to be measured."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield None, str(k)
            yield from _strings(v, str(k))
    elif isinstance(value, list):
        if value and all(isinstance(v, (int, float, list)) for v in value):
            yield key, value
        else:
            for v in value:
                yield from _strings(v, key)
    else:
        yield key, value


def _size(value: Any) -> int:
    return sum(_size(v) for v in value) if isinstance(value, list) else 1


class _Batch:
    """The strings of consecutive records, scanned together: each pattern runs once over
    them all, joined with SEP, so a regex pass's fixed cost is not paid per string (a
    line of a hundred thousand one-letter strings costs what one long string does)."""

    def __init__(self) -> None:
        self.strings: list[tuple[str, str | None, str, bool]] = []  # where, key (None: a dict key itself), text, number
        self.found: list[tuple[int, int, Finding]] = []  # (string, -1, finding) for what is not a pattern's
        self.size = 0  # characters

    def add(self, value: Any, where: str) -> None:
        """A record's strings, and its findings that need no pattern."""
        for key, leaf in _strings(value):
            if isinstance(leaf, list):
                if _size(leaf) >= PIXEL_LIKE:
                    self.found.append((len(self.strings), -1, Finding("leakage", where, _message(key, f"an array of {_size(leaf)} numbers: the size of an image"))))
            elif key is not None and ALLOWED_KEYS.match(key):
                continue
            elif isinstance(leaf, str):
                if len(leaf) > MAX_LINE:  # in a document parsed whole
                    self.found.append((len(self.strings), -1, Finding("leakage", where, _message(key, f"{len(leaf):,} characters, {_OVER_LONG}"))))
                self.add_string(where, key, leaf, False)
            elif isinstance(leaf, int) and not isinstance(leaf, bool) and key and 0 <= leaf < 10**20:  # an identifier kept as a number
                self.add_string(where, key, str(leaf), True)

    def add_string(self, where: str, key: str | None, text: str, number: bool) -> None:
        """`number`: the digits of a number, read only for the kinds named by context."""
        self.strings.append((where, key, text, number))
        self.size += len(text) + len(key or "")

    def hits(self) -> dict[tuple[int, int], str]:
        """(string, pattern) -> what its first match shows. A number is read only for the
        kinds named by context, each kind so named in "key: text"."""
        texts = ["" if number else text for _, _, text, number in self.strings]
        keyed = [f"{key}: {text}" if key else text for _, key, text, _ in self.strings]
        joined: dict[tuple[bool, bool], tuple[str, list[int]]] = {}

        def variant(context: bool, lower: bool) -> tuple[str, list[int]]:
            if (context, lower) not in joined:
                parts = keyed if context else texts
                if lower:
                    parts = [_lower(part) for part in parts]
                joined[context, lower] = SEP.join(parts), list(accumulate((len(part) + len(SEP) for part in parts), initial=0))[:-1]
            return joined[context, lower]

        out: dict[tuple[int, int], str] = {}
        for index, pattern in enumerate(PATTERNS):
            text, starts = variant(pattern.context, pattern.lower)
            for string, shown in pattern.matches(text, starts, variant(pattern.context, True)[0]):
                out[string, index] = shown
        named = {string for (string, index) in out if index in _NATIONAL_FORMATS}
        return {hit: shown for hit, shown in out.items() if not (hit[1] == _NATIONAL_NAMED and hit[0] in named)}  # already named by its format

    def scan(self) -> list[Finding]:
        """The batch's findings, string by string and in PATTERNS' order; the batch is
        emptied."""
        found = self.found + [
            (string, index, Finding("leakage", self.strings[string][0], _message(self.strings[string][1], PATTERNS[index].what, shown)))
            for (string, index), shown in self.hits().items()
        ]
        self.strings, self.found, self.size = [], [], 0
        return [finding for _, _, finding in sorted(found, key=lambda hit: hit[:2])]


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _lower(text: str) -> str:
    """A to Z in lower case, nothing else: the patterns that read lower case look for
    ASCII words, and str.lower changes some letters' length or class (İ is i and a
    combining dot, which is no word character)."""
    return text.lower() if text.isascii() else text.translate(_ASCII_LOWER)


def scan_value(value: Any, where: str) -> list[Finding]:
    """The findings in one record or document."""
    batch = _Batch()
    batch.add(value, where)
    return batch.scan()


def _kinds(text: str) -> dict[str, str]:
    """What kinds of patient data one text holds, and what each first match shows."""
    batch = _Batch()
    batch.add_string("", "", text, False)
    return {PATTERNS[index].what: shown for (_, index), shown in batch.hits().items()}


def _message(key: str | None, what: str, shown: str | None = None) -> str:
    """Who holds it: a value's key (cut short: a key can be long, or patient data
    itself), a key, or a line of text."""
    holder = "a key" if key is None else f"`{key if len(key) <= 64 else key[:48] + '...'}`" if key else "the line"
    return f"{holder} holds {what}" + (f": {_shown(shown)}" if shown is not None else "")


def _shown(text: str) -> str:
    """Enough to find it, not the identifier in the audit's own report: a third of it at
    most (four characters and two)."""
    text = text.strip(" \t\r\n\x00\"'=(:")
    head, tail = min(4, len(text) // 4), min(2, len(text) // 6)
    return repr(text[:head] + "..." + (text[-tail:] if tail else ""))


def _over_long(first: bytes, handle: IO[bytes], where: str) -> list[Finding]:
    """A line longer than MAX_LINE, `first` its first piece: a finding for its length,
    and a plain-text scan of it in windows of WINDOW bytes that repeat the last OVERLAP
    characters of the one before, each kind reported once."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    found: dict[str, str] = {}
    size, piece, carried, ended = 0, first, "", False
    while piece and not ended:
        ended = piece.endswith(b"\n")
        size += len(piece) - ended
        text = carried + decoder.decode(piece, final=ended)
        for what, shown in _kinds(text).items():
            found.setdefault(what, shown)
        carried = text[-OVERLAP:]
        piece = b"" if ended else handle.readline(WINDOW)
    decoder.decode(b"", final=True)
    return [Finding("leakage", where, f"is {size:,} bytes long, {_OVER_LONG} (scanned as plain text)")] + [
        Finding("leakage", where, _message("", what, shown)) for what, shown in found.items()
    ]


def _lines(handle: IO[bytes], name: str, as_json: bool) -> list[Finding]:
    """Line by line, each read at most MAX_LINE bytes at a time, JSON lines as values,
    scanned in batches of about BATCH characters."""
    out: list[Finding] = []
    batch = _Batch()
    number = 0
    while line := handle.readline(MAX_LINE + 1):
        number += 1
        where = f"{name} line {number}"
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            out += batch.scan() + _over_long(line, handle, where)
            continue
        text = line.decode("utf-8").rstrip("\n").rstrip("\r")
        value: Any = text
        if as_json:
            try:
                value = json.loads(text)
            except (ValueError, RecursionError):  # not JSON, an integer past Python's digit limit, or nesting past its stack
                pass
        try:
            batch.add(value, where)
        except RecursionError:
            batch.add(text, where)
        if batch.size >= BATCH:
            out += batch.scan()
    return out + batch.scan()


def scan_file(path: Path, name: str) -> list[Finding]:
    """A file's findings, reading at most MAX_DOCUMENT (a whole .json or .toml) or
    MAX_LINE + WINDOW bytes at a time."""
    try:
        with path.open("rb") as handle:
            document = handle.read(MAX_DOCUMENT + 1) if path.suffix in (".json", ".toml") else b""
            if 0 < len(document) <= MAX_DOCUMENT:
                text = document.decode("utf-8")
                try:
                    return scan_value(json.loads(text) if path.suffix == ".json" else tomllib.loads(text), name)
                except (ValueError, RecursionError):  # JSONDecodeError and TOMLDecodeError are ValueErrors
                    pass
            handle.seek(0)
            del document
            return _lines(handle, name, as_json=path.suffix == ".jsonl")
    except UnicodeDecodeError:
        return [Finding("leakage", name, "not UTF-8 text: binary data in a text output")]


def leakage(evidence: Evidence) -> list[Finding]:
    files = {party.file.path for party in evidence.parties.values()}
    root = evidence.run_dir.path if evidence.run_dir else None
    if root is not None:
        files |= {p for p in root.rglob("*") if p.is_file() and p.suffix in SCANNED and p.name not in NOT_EVIDENCE}
    out = []
    for path in sorted(files):
        out += scan_file(path, str(path.relative_to(root)) if root and path.is_relative_to(root) else path.name)
    return out
