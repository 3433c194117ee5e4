//! `#[root_test]`: a `#[test]` that needs root (network namespaces, eBPF). Without root it is
//! skipped with a note, and fails under `CI=true`, where skipping would hide it; see
//! `enforcer_testbed::require_root`. An attribute rather than a `macro_rules!` wrapper so that
//! rustfmt keeps formatting the tests' bodies.

use proc_macro::{Delimiter, Group, TokenStream, TokenTree};

#[proc_macro_attribute]
pub fn root_test(arguments: TokenStream, item: TokenStream) -> TokenStream {
    if !arguments.is_empty() {
        return error("#[root_test] takes no arguments");
    }
    let mut tokens: Vec<TokenTree> = item.into_iter().collect();
    let name = tokens.windows(2).find_map(|pair| match pair {
        [TokenTree::Ident(keyword), TokenTree::Ident(name)] if keyword.to_string() == "fn" => {
            Some(name.to_string())
        }
        _ => None,
    });
    let (Some(name), Some(TokenTree::Group(body))) = (name, tokens.pop()) else {
        return error("#[root_test] goes on a function with a body");
    };
    let mut guarded: TokenStream =
        format!("if !::enforcer_testbed::require_root({name:?}) {{ return; }}")
            .parse()
            .expect("the guard is valid Rust");
    guarded.extend(body.stream());
    let mut new_body = Group::new(Delimiter::Brace, guarded);
    new_body.set_span(body.span());
    tokens.push(TokenTree::Group(new_body));
    let mut test: TokenStream = "#[test]".parse().expect("an attribute");
    test.extend(tokens);
    test
}

fn error(message: &str) -> TokenStream {
    format!("compile_error!({message:?});")
        .parse()
        .expect("a compile_error! invocation")
}
