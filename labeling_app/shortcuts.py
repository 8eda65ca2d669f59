"""Keyboard shortcuts for the labeling pages.

Streamlit cannot bind keys, so a tiny script in a zero-height same-origin iframe listens
on the page's document and clicks the page's own widgets, found by the `st-key-<key>`
class Streamlit puts on every keyed element. Everything the script needs is passed in as
JSON; no page data goes into it.

Ranking: digits 1-9 give the highlighted response that rank and move the highlight to the
next response (as a rank given by mouse does; the highlight is kept per item across
reruns, and a new item starts at its first unranked response); letters a-z move the highlight to that response; Ctrl+Enter (or Cmd+Enter)
clicks the page's submit button. Single keys are ignored while the annotator is typing
in a text field, so a rationale can contain digits.
"""

from __future__ import annotations

import json
from typing import Sequence

import streamlit as st

RANKING_HELP = ("Keyboard: press 1–{k} to give the highlighted response that rank (it then moves to the next); "
                "press a letter (A–{last}) to highlight that response; Ctrl+Enter submits. "
                "Equal numbers mean a tie; 1 is best.")
AB_HELP = "Keyboard: A = A is better, B = B is better, T = tie, X = both bad, S = skip."

_SCRIPT = """<script>
(() => {
  const cfg = %s;
  const win = window.parent, doc = win.document;
  if (win.__rlhfKeys) doc.removeEventListener("keydown", win.__rlhfKeys, true);
  if (win.__rlhfClick) doc.removeEventListener("click", win.__rlhfClick, true);
  const box = (key) => doc.querySelector(".st-key-" + key);
  const click = (key) => { const b = box(key); const btn = b && b.querySelector("button"); if (btn) btn.click(); };
  // Any rerun can rebuild this iframe, so the highlight lives on the page, keyed by the
  // item's widgets: a fresh script for the same item picks it up where the last one left it.
  const item = cfg.responses.join(" ");
  const ranked = (i) => { const b = box(cfg.radios[i]); return !!(b && b.querySelector("input:checked")); };
  if (!win.__rlhfHighlight || win.__rlhfHighlight.item !== item) {
    // A new item starts at its first response without a rank, never on one ranked by mouse.
    const first = cfg.radios.findIndex((_, i) => !ranked(i));
    win.__rlhfHighlight = { item, current: first < 0 ? 0 : first };
  }
  const state = win.__rlhfHighlight;
  const highlight = () => cfg.responses.forEach((key, i) => {
    const b = box(key);
    if (b) b.style.outline = i === state.current ? "3px solid #ff4b4b" : "";
  });
  const setRank = (i, n) => {
    const b = box(cfg.radios[i]);
    if (!b) return false;
    const option = Array.from(b.querySelectorAll("label")).find((l) => l.innerText.trim() === String(n));
    if (option) option.click();
    return !!option;
  };
  const typing = (t) => t && (t.tagName === "TEXTAREA" || t.isContentEditable ||
                              (t.tagName === "INPUT" && t.type !== "radio" && t.type !== "checkbox"));
  const onKey = (e) => {
    // A page switch can drop the iframe while the listener lives on; it then removes itself.
    if (!window.frameElement || !window.frameElement.isConnected) {
      doc.removeEventListener("keydown", onKey, true);
      doc.removeEventListener("click", onClick, true);
      return;
    }
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter" && cfg.submit) {
      e.preventDefault();
      // Blur first so a text field's pending value is sent before the click.
      if (doc.activeElement && doc.activeElement.blur) doc.activeElement.blur();
      setTimeout(() => click(cfg.submit), 150);
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey || typing(e.target)) return;
    const key = e.key.toLowerCase();
    const n = cfg.radios.length;
    if (n && /^[1-9]$/.test(key) && Number(key) <= n) {
      e.preventDefault();
      setRank(state.current, Number(key));  // its click moves the highlight on
    } else if (n && key.length === 1 && key >= "a" && key.charCodeAt(0) - 97 < n) {
      e.preventDefault();
      state.current = key.charCodeAt(0) - 97;
      highlight();
    } else if (cfg.keys[key]) {
      e.preventDefault();
      click(cfg.keys[key]);
    }
  };
  // A rank given by key or by mouse moves the highlight past that response, so the next
  // digit never overwrites a rank just given.
  const onClick = (e) => {
    const i = cfg.radios.findIndex((key) => { const b = box(key); return b && b.contains(e.target); });
    if (i < 0 || !e.target.closest("label")) return;
    state.current = Math.min(i + 1, cfg.radios.length - 1);
    highlight();
  };
  win.__rlhfKeys = onKey;
  win.__rlhfClick = onClick;
  doc.addEventListener("keydown", onKey, true);
  doc.addEventListener("click", onClick, true);
  highlight();
})();
</script>"""


def install(responses: Sequence[str] = (), radios: Sequence[str] = (), submit: str | None = None,
            keys: dict[str, str] | None = None) -> None:
    """Bind the page's shortcuts.

    responses: keys of the containers to highlight, one per response in shown order;
    radios: keys of the rank radios, same order; submit: key of the button Ctrl+Enter
    clicks; keys: single key -> key of a button it clicks (only used where no radios are).
    """
    cfg = {"responses": list(responses), "radios": list(radios), "submit": submit, "keys": keys or {}}
    # Escaping "</" means no value can close the script tag early (they are the pages' own
    # widget keys anyway).
    st.iframe(_SCRIPT % json.dumps(cfg).replace("</", "<\\/"), height=1, tab_index=-1, alt="keyboard shortcuts")
