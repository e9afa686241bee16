//! The status page: one self-contained HTML document (inline CSS and script, no
//! external assets) that shows every frontend, backend and server and refreshes
//! itself every 2 s from `GET /api/v1/backends`.
//!
//! The page carries the data it was served with, so it shows the state at once
//! (and without script); the refresh then fetches the same document from the
//! same origin, which sends the browser's Basic credentials along.

const TEMPLATE: &str = include_str!("status.html");
const PLACEHOLDER: &str = "/*INITIAL_DATA*/null";

/// The page with `overview` (the `/api/v1/backends` JSON document) built in.
pub fn render(overview: &str) -> String {
    // In JSON, '<' only occurs inside strings, where \u003c means the same and
    // cannot close the script element.
    let data = overview.replace('<', "\\u003c");
    TEMPLATE.replacen(PLACEHOLDER, &data, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_embedded_and_cannot_end_the_script() {
        let page = render(r#"{"generation":7,"backends":[{"name":"</script><b>"}]}"#);
        assert!(!page.contains(PLACEHOLDER));
        assert!(page.contains(r#""generation":7"#));
        assert!(!page.contains("</script><b>"));
        assert_eq!(page.matches("</script>").count(), 1);
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "no external assets"
        );
    }
}
