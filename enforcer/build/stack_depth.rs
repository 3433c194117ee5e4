//! How much stack each eBPF program's deepest call chain needs, counted as the verifiers of the
//! oldest kernels in the matrix (5.10, 6.1) count it. The build fails where they would refuse to
//! load the programs, and names the chain, instead of the kernel matrix failing five minutes
//! later with "combined stack size of 7 calls is 544. Too large".
//!
//! Those verifiers give each function of a chain of BPF-to-BPF calls the stack it touches below
//! its frame pointer, rounded up to 32 bytes (a function that touches none counts 32), and
//! refuse a chain whose sum is over 512 bytes. Newer kernels round to 16 under the JIT, so
//! this count is the stricter one.
//!
//! Compiled into the build script, and into the library for its unit tests.

use std::{
    collections::{HashMap, hash_map::Entry},
    fmt,
};

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionIndex, SymbolKind};

/// The verifier's limit on a chain's combined stack (`MAX_BPF_STACK`).
pub const STACK_LIMIT: u32 = 512;

/// What those verifiers round each frame up to: the interpreter's stack granularity.
const FRAME_GRANULE: u32 = 32;

const INSTRUCTION: usize = 8;
const FRAME_POINTER: u8 = 10;
/// `call` with `src_reg` 1: a call to a BPF function, not to a helper.
const CALL: u8 = 0x85;
const PSEUDO_CALL: u8 = 1;
/// `lddw`: the one instruction two slots long.
const LOAD_WIDE: u8 = 0x18;
const MOVE_REGISTER: u8 = 0xbf;
const ADD_IMMEDIATE: u8 = 0x07;
const CLASS_LOAD_REGISTER: u8 = 0x01;
const CLASS_STORE_IMMEDIATE: u8 = 0x02;
const CLASS_STORE_REGISTER: u8 = 0x03;

/// One program's deepest call chain.
#[derive(Debug, Clone)]
pub struct Chain {
    /// From the program's entry point down: each function's name and the stack it touches,
    /// before rounding.
    pub frames: Vec<(String, u32)>,
    /// The chain's combined stack as the verifier counts it.
    pub bytes: u32,
}

impl Chain {
    pub fn program(&self) -> &str {
        &self.frames[0].0
    }
}

impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} needs {} bytes:", self.program(), self.bytes)?;
        for (depth, (name, bytes)) in self.frames.iter().enumerate() {
            let arrow = if depth == 0 { " " } else { " -> " };
            write!(f, "{arrow}{} ({bytes})", readable(name))?;
        }
        Ok(())
    }
}

/// A function of the object: its frame and whom it calls.
#[derive(Debug)]
struct Function {
    name: String,
    /// Where it starts: its section and byte offset.
    start: (SectionIndex, u64),
    /// Bytes below the frame pointer it touches.
    frame: u32,
    /// Where the functions it calls start.
    calls: Vec<(SectionIndex, u64)>,
    /// A program's entry point (in a program's section, not `.text`).
    program: bool,
}

/// The deepest call chain of every program in the object.
pub fn deepest_chains(object: &[u8]) -> Result<Vec<Chain>, String> {
    let functions = functions(object)?;
    let by_start: HashMap<_, _> = functions
        .iter()
        .enumerate()
        .map(|(index, function)| (function.start, index))
        .collect();
    let mut memo = HashMap::new();
    functions
        .iter()
        .enumerate()
        .filter(|(_, function)| function.program)
        .map(|(index, _)| deepest(index, &functions, &by_start, &mut memo, &mut Vec::new()))
        .collect()
}

/// The deepest chain from `index` down, memoised; `path` holds the calls on the way, to
/// name a recursion (which the verifier refuses) rather than loop.
fn deepest(
    index: usize,
    functions: &[Function],
    by_start: &HashMap<(SectionIndex, u64), usize>,
    memo: &mut HashMap<usize, Chain>,
    path: &mut Vec<usize>,
) -> Result<Chain, String> {
    if let Some(chain) = memo.get(&index) {
        return Ok(chain.clone());
    }
    let function = &functions[index];
    if path.contains(&index) {
        return Err(format!("{} calls itself", readable(&function.name)));
    }
    path.push(index);
    let mut below = Chain {
        frames: Vec::new(),
        bytes: 0,
    };
    for target in &function.calls {
        let callee = *by_start.get(target).ok_or_else(|| {
            format!(
                "{} calls into no function (section {}, offset {})",
                readable(&function.name),
                target.0.0,
                target.1
            )
        })?;
        let chain = deepest(callee, functions, by_start, memo, path)?;
        if chain.bytes > below.bytes {
            below = chain;
        }
    }
    path.pop();
    let mut frames = vec![(function.name.clone(), function.frame)];
    frames.extend(below.frames);
    let chain = Chain {
        frames,
        bytes: rounded(function.frame) + below.bytes,
    };
    memo.insert(index, chain.clone());
    Ok(chain)
}

/// A frame as the verifier counts it.
fn rounded(frame: u32) -> u32 {
    frame.max(1).div_ceil(FRAME_GRANULE) * FRAME_GRANULE
}

/// Every function symbol of the object, with its frame and calls.
fn functions(object: &[u8]) -> Result<Vec<Function>, String> {
    let file =
        object::File::parse(object).map_err(|error| format!("not an ELF object: {error}"))?;
    let mut functions = Vec::new();
    // Each section's relocated calls, read once for all the functions in it.
    let mut relocated_by_section = HashMap::new();
    for symbol in file.symbols() {
        let Some(section_index) = symbol.section_index() else {
            continue;
        };
        if symbol.kind() != SymbolKind::Text || symbol.size() == 0 {
            continue;
        }
        let name = symbol.name().map_err(|error| error.to_string())?.to_owned();
        let section = file
            .section_by_index(section_index)
            .map_err(|error| error.to_string())?;
        let data = section.data().map_err(|error| error.to_string())?;
        let start = symbol.address();
        let code = usize::try_from(start)
            .ok()
            .and_then(|start| data.get(start..start + usize::try_from(symbol.size()).ok()?))
            .ok_or_else(|| format!("{name} lies outside its section"))?;
        let relocated = match relocated_by_section.entry(section_index) {
            Entry::Occupied(known) => known.into_mut(),
            Entry::Vacant(new) => new.insert(relocated_calls(&file, &section)?),
        };
        let calls = calls(code, start, section_index, relocated);
        functions.push(Function {
            program: section.name().map_err(|error| error.to_string())? != ".text",
            name,
            start: (section_index, start),
            frame: frame(code),
            calls,
        });
    }
    Ok(functions)
}

/// Where the section's relocated instructions point: the offset of each relocated
/// instruction, and its symbol's section and offset (a call's target adds its immediate).
fn relocated_calls(
    file: &object::File<'_>,
    section: &object::Section<'_, '_>,
) -> Result<HashMap<u64, (SectionIndex, u64)>, String> {
    let mut targets = HashMap::new();
    for (offset, relocation) in section.relocations() {
        let RelocationTarget::Symbol(index) = relocation.target() else {
            continue;
        };
        let symbol = file
            .symbol_by_index(index)
            .map_err(|error| error.to_string())?;
        if let Some(section) = symbol.section_index() {
            targets.insert(offset, (section, symbol.address()));
        }
    }
    Ok(targets)
}

/// The starts of the functions `code` calls. A call's immediate counts instructions from the
/// next one: from the call itself, or, when relocated, from the start of its symbol.
fn calls(
    code: &[u8],
    start: u64,
    section: SectionIndex,
    relocated: &HashMap<u64, (SectionIndex, u64)>,
) -> Vec<(SectionIndex, u64)> {
    instructions(code)
        .filter(|(_, instruction)| instruction[0] == CALL && instruction[1] >> 4 == PSEUDO_CALL)
        .map(|(offset, instruction)| {
            let at = start + offset as u64;
            let (section, base) = relocated.get(&at).copied().unwrap_or((section, at));
            let skip = i64::from(immediate(instruction)) + 1;
            let target = base as i64 + skip * INSTRUCTION as i64;
            (section, target as u64)
        })
        .collect()
}

/// The bytes below the frame pointer a function touches: loads and stores through it, and
/// pointers into its frame (`rX = r10; rX += -n`) that it hands to helpers and callees.
fn frame(code: &[u8]) -> u32 {
    let mut deepest: i64 = 0;
    // For each register, the offset from the frame pointer it holds, if it holds one.
    let mut frame_pointers: [Option<i64>; 11] = [None; 11];
    frame_pointers[usize::from(FRAME_POINTER)] = Some(0);
    for (_, instruction) in instructions(code) {
        let opcode = instruction[0];
        let destination = usize::from(instruction[1] & 0x0f).min(10);
        let source = usize::from(instruction[1] >> 4).min(10);
        let offset = i64::from(i16::from_le_bytes([instruction[2], instruction[3]]));
        let through = match opcode & 0x07 {
            CLASS_LOAD_REGISTER => frame_pointers[source],
            CLASS_STORE_IMMEDIATE | CLASS_STORE_REGISTER => frame_pointers[destination],
            _ => None,
        };
        if let Some(base) = through {
            deepest = deepest.max(-(base + offset));
        }
        if matches!(opcode & 0x07, CLASS_STORE_IMMEDIATE | CLASS_STORE_REGISTER) {
            continue;
        }
        if opcode == CALL {
            // Calls return in r0 and clobber r1–r5.
            frame_pointers[..6].fill(None);
            continue;
        }
        if destination == usize::from(FRAME_POINTER) {
            continue;
        }
        frame_pointers[destination] = match opcode {
            MOVE_REGISTER => frame_pointers[source],
            ADD_IMMEDIATE => frame_pointers[destination].map(|base| {
                let pointer = base + i64::from(immediate(instruction));
                deepest = deepest.max(-pointer);
                pointer
            }),
            // Jumps write no register; anything else that writes one leaves no pointer in it.
            _ if matches!(opcode & 0x07, 0x05 | 0x06) => frame_pointers[destination],
            _ => None,
        };
    }
    u32::try_from(deepest).unwrap_or(u32::MAX)
}

/// The instructions of `code` with their byte offsets; a wide load's second slot is skipped.
fn instructions(code: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut offset = 0;
    std::iter::from_fn(move || {
        let instruction = code.get(offset..offset + INSTRUCTION)?;
        let at = offset;
        offset += if instruction[0] == LOAD_WIDE {
            2 * INSTRUCTION
        } else {
            INSTRUCTION
        };
        Some((at, instruction))
    })
}

fn immediate(instruction: &[u8]) -> i32 {
    i32::from_le_bytes([
        instruction[4],
        instruction[5],
        instruction[6],
        instruction[7],
    ])
}

/// A Rust function's path (`enforcer::verdict::judge_tracked`) from its symbol, mangled the
/// way the toolchain mangles it (v0: `_RNvNtCs…_8enforcer7verdict13judge_tracked`); any
/// other name, or one with generic arguments, as it is.
pub fn readable(name: &str) -> String {
    name.strip_prefix("_R")
        .and_then(demangled_path)
        .unwrap_or_else(|| name.to_owned())
}

/// A v0 path of nested names only: `N` and a namespace letter per level, the crate root `C`,
/// then each level's identifier, each with its length and an optional disambiguator.
fn demangled_path(mut rest: &str) -> Option<String> {
    while let Some(inner) = rest.strip_prefix('N') {
        rest = inner.get(1..)?;
    }
    rest = rest.strip_prefix('C')?;
    let mut parts = Vec::new();
    while !rest.is_empty() {
        if let Some(disambiguated) = rest.strip_prefix('s') {
            rest = &disambiguated[disambiguated.find('_')? + 1..];
        }
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let length: usize = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        rest = rest.strip_prefix('_').unwrap_or(rest);
        parts.push(rest.get(..length)?);
        rest = &rest[length..];
    }
    Some(parts.join("::"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instruction(
        opcode: u8,
        destination: u8,
        source: u8,
        offset: i16,
        immediate: i32,
    ) -> [u8; 8] {
        let [o0, o1] = offset.to_le_bytes();
        let [i0, i1, i2, i3] = immediate.to_le_bytes();
        [opcode, source << 4 | destination, o0, o1, i0, i1, i2, i3]
    }

    fn code(instructions: &[[u8; 8]]) -> Vec<u8> {
        instructions.concat()
    }

    const EXIT: [u8; 8] = [0x95, 0, 0, 0, 0, 0, 0, 0];

    #[test]
    fn a_frame_is_the_deepest_byte_touched_through_the_frame_pointer() {
        // *(u64 *)(r10 - 8) = r1; r2 = *(u32 *)(r10 - 20); *(u8 *)(r10 - 3) = 7
        let stores_and_loads = code(&[
            instruction(0x7b, 10, 1, -8, 0),
            instruction(0x61, 2, 10, -20, 0),
            instruction(0x72, 10, 0, -3, 7),
            EXIT,
        ]);
        assert_eq!(frame(&stores_and_loads), 20);
        assert_eq!(frame(&code(&[instruction(0xb7, 0, 0, 0, 1), EXIT])), 0);
    }

    #[test]
    fn a_pointer_into_the_frame_counts_where_it_points() {
        // r2 = r10; r2 += -96; r1 = map; call map_lookup_elem
        let lookup = code(&[
            instruction(MOVE_REGISTER, 2, 10, 0, 0),
            instruction(ADD_IMMEDIATE, 2, 0, 0, -96),
            instruction(LOAD_WIDE, 1, 1, 0, 0),
            [0; 8],
            instruction(CALL, 0, 0, 0, 1),
            EXIT,
        ]);
        assert_eq!(frame(&lookup), 96);
        // r3 = r10; r3 += -16; r4 = r3; *(u64 *)(r4 - 40) = r1
        let copied = code(&[
            instruction(MOVE_REGISTER, 3, 10, 0, 0),
            instruction(ADD_IMMEDIATE, 3, 0, 0, -16),
            instruction(MOVE_REGISTER, 4, 3, 0, 0),
            instruction(0x7b, 4, 1, -40, 0),
            EXIT,
        ]);
        assert_eq!(frame(&copied), 56);
    }

    #[test]
    fn a_register_overwritten_or_clobbered_by_a_call_is_no_pointer_into_the_frame() {
        // r2 = r10; r2 = 0; *(u64 *)(r2 - 200) = r1: a store through a plain register
        let overwritten = code(&[
            instruction(MOVE_REGISTER, 2, 10, 0, 0),
            instruction(0xb7, 2, 0, 0, 0),
            instruction(0x7b, 2, 1, -200, 0),
            EXIT,
        ]);
        assert_eq!(frame(&overwritten), 0);
        // r1 = r10; call helper; *(u64 *)(r1 - 200) = r0
        let clobbered = code(&[
            instruction(MOVE_REGISTER, 1, 10, 0, 0),
            instruction(CALL, 0, 0, 0, 5),
            instruction(0x7b, 1, 0, -200, 0),
            EXIT,
        ]);
        assert_eq!(frame(&clobbered), 0);
    }

    #[test]
    fn a_wide_loads_second_slot_is_not_read_as_an_instruction() {
        // The second slot's bytes would read as *(u64 *)(r10 - 256) = r0.
        let wide = code(&[
            instruction(LOAD_WIDE, 1, 0, 0, 0),
            instruction(0x7b, 10, 0, -256, 0),
            EXIT,
        ]);
        assert_eq!(frame(&wide), 0);
    }

    #[test]
    fn a_call_lands_after_its_immediate_from_itself_or_from_its_relocations_symbol() {
        let text = SectionIndex(2);
        let program = SectionIndex(4);
        // At 16 in the program's section: call +3 (to 16 + 8 + 24 = 48); at 24: call -1,
        // relocated against .text (to .text + 0); a helper call at 32 is none.
        let body = code(&[
            EXIT,
            EXIT,
            instruction(CALL, 0, PSEUDO_CALL, 0, 3),
            instruction(CALL, 0, PSEUDO_CALL, 0, -1),
            instruction(CALL, 0, 0, 0, 1),
        ]);
        let relocated = HashMap::from([(24, (text, 0))]);
        assert_eq!(
            calls(&body, 0, program, &relocated),
            vec![(program, 48), (text, 0)]
        );
    }

    fn function(name: &str, start: u64, frame: u32, calls: &[u64]) -> Function {
        let section = SectionIndex(2);
        Function {
            name: name.to_owned(),
            start: (section, start),
            frame,
            calls: calls.iter().map(|&start| (section, start)).collect(),
            program: false,
        }
    }

    fn chain_from(functions: Vec<Function>) -> Result<Chain, String> {
        let by_start = functions
            .iter()
            .enumerate()
            .map(|(index, function)| (function.start, index))
            .collect();
        deepest(
            0,
            &functions,
            &by_start,
            &mut HashMap::new(),
            &mut Vec::new(),
        )
    }

    #[test]
    fn the_deepest_chain_sums_frames_rounded_up_to_32_and_an_empty_frame_counts_32() {
        let chain = chain_from(vec![
            function("entry", 0, 96, &[8, 16]),
            function("shallow", 8, 200, &[]),
            function("middle", 16, 48, &[24]),
            function("leaf", 24, 0, &[]),
        ])
        .unwrap();
        // Below entry's 96: shallow's 224 beats middle (64) and leaf (32).
        assert_eq!(chain.bytes, 96 + 224);
        assert_eq!(chain.frames[1].0, "shallow");
        let chain = chain_from(vec![
            function("entry", 0, 96, &[8, 16]),
            function("shallow", 8, 60, &[]),
            function("middle", 16, 48, &[24]),
            function("leaf", 24, 0, &[]),
        ])
        .unwrap();
        assert_eq!(chain.bytes, 96 + 64 + 32);
        assert_eq!(
            chain.to_string(),
            "entry needs 192 bytes: entry (96) -> middle (48) -> leaf (0)"
        );
    }

    #[test]
    fn recursion_and_calls_into_no_function_are_errors() {
        let recursion = chain_from(vec![
            function("entry", 0, 8, &[8]),
            function("again", 8, 8, &[8]),
        ]);
        assert_eq!(recursion.unwrap_err(), "again calls itself");
        let nowhere = chain_from(vec![function("entry", 0, 8, &[40])]);
        assert!(nowhere.unwrap_err().contains("offset 40"));
    }

    #[test]
    fn rust_symbols_read_as_their_paths() {
        assert_eq!(
            readable("_RNvNtCsg6QVjolLrNA_8enforcer7verdict13judge_tracked"),
            "enforcer::verdict::judge_tracked"
        );
        assert_eq!(readable("enf_tc_egress"), "enf_tc_egress");
        // Generic arguments are not read: the symbol stays whole.
        let generic = "_RINvNtCs1a_8enforcer6report6reportNtB4_5ShapeEB4_";
        assert_eq!(readable(generic), generic);
    }
}
