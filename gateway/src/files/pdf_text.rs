//! A PDF's text, for file search, inside the `chorus preview-worker` process (kind
//! `text`): the PDF is untrusted, so it is taken apart here, under the worker's
//! `setrlimit` on memory and CPU time and the server's deadline, and nowhere else.
//!
//! The extractor is `hayro-interpret` (pure Rust, the interpreter under the `page1`
//! preview's renderer): its pages are interpreted into a [`Device`] of our own that draws
//! nothing and keeps each glyph's Unicode value (from the font's `ToUnicode` map, or its
//! glyph name) and position. Text is rebuilt from positions as PDF viewers' text
//! selection does: a glyph whose baseline moved by half an em or more starts a new line,
//! and a gap of [`WORD_GAP_EM`] between one glyph's ink and the next makes a space, since
//! many PDFs position words without drawing a space. Invisible text (a scanned page's OCR
//! layer) is text too. Bounds: [`PAGES_MAX`] pages and
//! [`chorus_search::extract::TEXT_BYTES_MAX`] bytes of text; time and memory are the
//! worker's limits.

use hayro::hayro_interpret::font::Glyph;
use hayro::hayro_interpret::{
    interpret_page, BlendMode, ClipPath, Context, Device, GlyphDrawMode, Image,
    InterpreterSettings, PageExt, Paint, PathDrawMode, SoftMask,
};
use hayro::hayro_syntax::Pdf;
use kurbo::{Affine, BezPath, Point, Rect, Shape};

/// The most pages whose text is read.
pub const PAGES_MAX: usize = 500;
/// A horizontal gap between two glyphs, in ems, from which they are two words.
pub const WORD_GAP_EM: f64 = 0.15;

/// The text of a PDF's pages, or why there is none to read.
pub fn pdf_text(bytes: Vec<u8>) -> Result<String, String> {
    let max = chorus_search::extract::TEXT_BYTES_MAX;
    let pdf =
        Pdf::new(std::sync::Arc::new(bytes)).map_err(|e| format!("not a readable PDF: {e:?}"))?;
    let mut sink = TextSink::default();
    for page in pdf.pages().iter().take(PAGES_MAX) {
        let (w, h) = page.render_dimensions();
        let mut context = Context::new(
            page.initial_transform(true),
            Rect::new(0.0, 0.0, f64::from(w), f64::from(h)),
            page.xref(),
            InterpreterSettings::default(),
        );
        interpret_page(page, &mut context, &mut sink);
        sink.end_line();
        if sink.text.len() >= max {
            break;
        }
    }
    Ok(chorus_search::extract::cap_text(sink.text))
}

/// Where the last glyph was, in device space (y down).
#[derive(Clone, Copy)]
struct Last {
    /// Its baseline.
    y: f64,
    /// Its right edge.
    right: f64,
    /// Its em, in device units.
    em: f64,
    /// Its origin and character, to drop the second drawing of a filled-and-stroked glyph.
    origin: Point,
    c: char,
}

/// A device that keeps text and draws nothing.
#[derive(Default)]
struct TextSink {
    text: String,
    last: Option<Last>,
}

impl TextSink {
    fn end_line(&mut self) {
        if !self.text.is_empty() && !self.text.ends_with('\n') {
            self.text.push('\n');
        }
        self.last = None;
    }

    fn glyph(&mut self, c: char, t: Affine, ink: Option<Rect>) {
        if self.text.len() >= chorus_search::extract::TEXT_BYTES_MAX {
            return;
        }
        let origin = t * Point::ZERO;
        let em = (t * Point::new(0.0, 1000.0) - origin).hypot();
        if !(em.is_finite() && em > 0.0 && origin.x.is_finite() && origin.y.is_finite()) {
            return;
        }
        // Glyph space is 1000 units per em; without an outline, guess half an em of ink.
        let (left, right) = match ink {
            Some(r) if r.width() > 0.0 => {
                ((t * Point::new(r.x0, 0.0)).x, (t * Point::new(r.x1, 0.0)).x)
            }
            _ => (origin.x, (t * Point::new(500.0, 0.0)).x),
        };
        if let Some(last) = self.last {
            if last.c == c && (last.origin - origin).hypot() < em * 0.01 {
                return;
            }
            if (origin.y - last.y).abs() >= last.em.max(em) * 0.5 {
                self.end_line();
            } else if left - last.right > last.em.max(em) * WORD_GAP_EM
                || origin.x + em < last.origin.x
            {
                self.space();
            }
        }
        if c.is_whitespace() {
            self.space();
        } else if !c.is_control() {
            self.text.push(c);
        }
        self.last = Some(Last {
            y: origin.y,
            right: right.max(left),
            em,
            origin,
            c,
        });
    }

    fn space(&mut self) {
        if !self.text.is_empty() && !self.text.ends_with([' ', '\n']) {
            self.text.push(' ');
        }
    }
}

impl<'a> Device<'a> for TextSink {
    fn set_soft_mask(&mut self, _: Option<SoftMask<'a>>) {}

    fn set_blend_mode(&mut self, _: BlendMode) {}

    fn draw_path(&mut self, _: &BezPath, _: Affine, _: &Paint<'a>, _: &PathDrawMode) {}

    fn push_clip_path(&mut self, _: &ClipPath) {}

    fn push_transparency_group(&mut self, _: f32, _: Option<SoftMask<'a>>, _: BlendMode) {}

    fn draw_glyph(
        &mut self,
        glyph: &Glyph<'a>,
        transform: Affine,
        glyph_transform: Affine,
        _: &Paint<'a>,
        _: &GlyphDrawMode,
    ) {
        let Some(c) = glyph.as_unicode() else {
            return;
        };
        let ink = match glyph {
            Glyph::Outline(o) => Some(o.outline().bounding_box()),
            Glyph::Type3(_) => None,
        };
        self.glyph(c, transform * glyph_transform, ink);
    }

    fn draw_image(&mut self, _: Image<'a, '_>, _: Affine) {}

    fn pop_clip_path(&mut self) {}

    fn pop_transparency_group(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::test_pdf::{one_page, text_lines};

    // Lines and words come back from glyph positions, spaces from gaps between words
    // drawn apart; a PDF that is not one is refused.
    #[test]
    fn text_of_a_page() {
        let pdf = text_lines(&["Quarterly zanzibar report", "Revenue grew"]);
        let text = pdf_text(pdf).unwrap();
        assert_eq!(text, "Quarterly zanzibar report\nRevenue grew\n");
        let drawn_spaces = one_page(
            612,
            792,
            "BT /F1 12 Tf 72 720 Td (Hello there, world) Tj ET\n",
        );
        assert_eq!(pdf_text(drawn_spaces).unwrap(), "Hello there, world\n");
        assert!(pdf_text(b"not a pdf".to_vec()).is_err());
    }
}
