//! Cross-checks between sections.
