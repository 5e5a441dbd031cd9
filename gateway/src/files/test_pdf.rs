//! PDFs written byte by byte, for tests: the unit tests of `pdf_text` use it as a module,
//! and the integration tests include this file (`tests/common/mod.rs`), so both make
//! their PDFs one way.

/// A PDF of one page, `width` × `height` points, drawing the content stream `content`,
/// with 12 pt Helvetica as the font `/F1`.
pub fn one_page(width: u32, height: u32, content: &str) -> Vec<u8> {
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_owned(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_owned(),
        format!(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {width} {height}] /Contents 4 0 R \
             /Resources << /Font << /F1 5 0 R >> >> >>"
        ),
        format!(
            "<< /Length {} >>\nstream\n{content}endstream",
            content.len()
        ),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
            .to_owned(),
    ];
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, body) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n{body}\nendobj\n", i + 1).as_bytes());
    }
    let xref = out.len();
    let n = objects.len() + 1;
    out.extend_from_slice(format!("xref\n0 {n}\n0000000000 65535 f \n").as_bytes());
    for o in offsets {
        out.extend_from_slice(format!("{o:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!("trailer\n<< /Size {n} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n").as_bytes(),
    );
    out
}

/// A one-page Letter PDF showing `lines` in 12 pt Helvetica, each word placed on its own
/// with `Tm` and no space drawn (as many PDF writers do), so that the spaces must come
/// from the gaps.
pub fn text_lines(lines: &[&str]) -> Vec<u8> {
    let mut content = String::from("BT /F1 12 Tf\n");
    for (i, line) in lines.iter().enumerate() {
        let y = 720 - 16 * i;
        let mut x = 72;
        for word in line.split(' ') {
            content.push_str(&format!("1 0 0 1 {x} {y} Tm ({word}) Tj\n"));
            // Wider than any 12 pt Helvetica word of this length, plus a gap.
            x += word.len() * 10 + 6;
        }
    }
    content.push_str("ET\n");
    one_page(612, 792, &content)
}
