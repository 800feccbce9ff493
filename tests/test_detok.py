"""Stop strings never reach the client, not even half of one."""

from engine.detok import Detokenizer


class CharTokenizer:
    """One token per character: makes the hold-back logic visible."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def feed(text, stop):
    d = Detokenizer(CharTokenizer(), stop)
    emitted = []
    for ch in text:
        out, hit = d.add(ord(ch))
        emitted.append(out)
        if hit:
            return "".join(emitted), hit
    return "".join(emitted) + d.flush(), None


def test_stop_string_is_cut_and_partial_matches_are_held_back():
    d = Detokenizer(CharTokenizer(), ["END"])
    assert d.add(ord("a")) == ("a", None)
    assert d.add(ord("E")) == ("", None)       # could be the start of END
    assert d.add(ord("N")) == ("", None)
    assert d.add(ord("D")) == ("", "END")


def test_false_alarm_is_released():
    assert feed("abENx", ["END"]) == ("abENx", None)


def test_text_before_the_stop_is_kept():
    assert feed("hello world. more", [". "]) == ("hello world", ". ")
