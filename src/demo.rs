//! The application's page at `GET /` (for the built-in `kv`, its demo page)
//! and the JavaScript client at `GET /berth.js`, served with an ETag and a
//! cache lifetime a proxy can use.

use actix_web::{http::header, web, HttpRequest, HttpResponse};

/// The built-in `kv` application's demo page, embedded at build time.
pub const KV_DEMO_PAGE: &str = include_str!("../static/index.html");

/// The JavaScript client (`clients/js/berth.js`), embedded at build time:
/// every node serves it at `GET /berth.js` (the demo page imports it).
pub const JS_CLIENT: &str = include_str!("../clients/js/berth.js");

/// A page and its ETag (a hash of its bytes, computed once).
#[derive(Debug, Clone)]
pub struct Page {
    html: &'static str,
    etag: String,
    content_type: &'static str,
}

/// [`JS_CLIENT`] as a [`Page`] (a type of its own: both live in one app's data).
#[derive(Debug, Clone)]
pub struct ClientScript(Page);

impl Default for ClientScript {
    fn default() -> Self {
        let mut p = Page::new(JS_CLIENT);
        p.content_type = "text/javascript; charset=utf-8";
        ClientScript(p)
    }
}

impl Page {
    /// The page `html`.
    pub fn new(html: &'static str) -> Self {
        use sha2::{Digest, Sha256};
        let h = Sha256::digest(html.as_bytes());
        let etag = format!(
            "\"{}\"",
            h.iter()
                .take(8)
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        Page {
            html,
            etag,
            content_type: "text/html; charset=utf-8",
        }
    }
}

/// `GET /`: the page, with validators and a cache lifetime.
pub async fn page(req: HttpRequest, page: web::Data<Page>) -> HttpResponse {
    serve(&req, &page)
}

/// `GET /berth.js`: the JavaScript client, as the page.
pub async fn client_script(req: HttpRequest, script: web::Data<ClientScript>) -> HttpResponse {
    serve(&req, &script.0)
}

fn serve(req: &HttpRequest, page: &Page) -> HttpResponse {
    let etag = page.etag.as_str();
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut resp = if fresh {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    resp.insert_header((header::ETAG, etag))
        .insert_header((header::CACHE_CONTROL, "public, max-age=300"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"));
    if fresh {
        resp.finish()
    } else {
        resp.content_type(page.content_type).body(page.html)
    }
}
