"""The sentence `Device.explain` shows the user: which past events (and note) a
recommendation rests on. Kept apart from the device SDK so the wording can change alone."""

from __future__ import annotations


def explanation_sentence(target_text: str, contrib: list[dict], base: float) -> str:
    """`contrib`: the past events behind the score, strongest first ({"text", "note"?})."""
    if not contrib:
        return f"'{target_text}' matches your overall interests (no single event stands out)"
    names = [f"'{c['text']}'" for c in contrib[:2]]
    reason = f"Recommended '{target_text}' because you recently chose " + " and ".join(names)
    notes = [c["note"] for c in contrib if c.get("note")]
    if notes:
        snippet = notes[0].strip().replace("\n", " ")
        reason += f" and wrote '{snippet[:60]}{'...' if len(snippet) > 60 else ''}'"
    return reason
