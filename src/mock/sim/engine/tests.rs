//! The simulated engine against what a vLLM-like server does: cache hits, LRU eviction,
//! preemption with recompute, the sequence cap, chunked prefill, step costs, determinism.

use super::*;

/// Tiny, round numbers: blocks of 4 tokens, 1 ms a step, 10 µs a prompt token, 100 µs a
/// decoding sequence, no attention cost.
fn small(num_blocks: u32) -> Params {
    Params {
        max_num_seqs: 64,
        max_batched_tokens: 4096,
        block_size: 4,
        num_blocks,
        prefix_caching: true,
        max_model_len: 100_000,
        step_us: 1000.0,
        prefill_us_per_token: 10.0,
        decode_us_per_seq: 100.0,
        attn_ns_per_token: 0.0,
    }
}

/// `shared` tokens common to every request with the same `group`, then `own` tokens of its own.
fn prompt(group: u32, shared: usize, id: u32, own: usize) -> Vec<u32> {
    let mut t: Vec<u32> = (0..shared as u32).map(|i| group * 1_000_000 + i).collect();
    t.extend((0..own as u32).map(|i| 0x8000_0000 + id * 10_000 + i));
    t
}

/// Steps until idle, collecting what finished.
fn drain(e: &mut Engine) -> (Duration, Vec<Done>) {
    let (mut t, mut done) = (Duration::ZERO, vec![]);
    while let Some(s) = e.step() {
        t += s.duration;
        done.extend(s.finished);
    }
    (t, done)
}

#[test]
fn a_shared_prefix_is_computed_once_while_it_stays_cached() {
    let mut e = Engine::new(small(1000));
    e.add(1, prompt(7, 400, 1, 10), 3).unwrap();
    let first = e.step().unwrap();
    assert_eq!(first.prefill_tokens, 410, "nothing cached yet: the whole prompt");
    drain(&mut e);
    e.add(2, prompt(7, 400, 2, 10), 3).unwrap();
    let second = e.step().unwrap();
    assert_eq!(second.prefill_tokens, 10, "the 400 shared tokens (100 blocks) are hits");
    let (_, done) = drain(&mut e);
    assert_eq!(done, vec![Done { id: 2, prompt_tokens: 410, cached_tokens: 400, output_tokens: 3, preemptions: 0 }]);
    let c = e.snapshot().counters;
    assert_eq!((c.prefix_queries, c.prefix_hits, c.prompt_tokens, c.prefill_tokens), (820, 400, 820, 420));
    assert!(first.duration > second.duration * 3, "prefill dominates: {first:?} vs {second:?}");
}

#[test]
fn at_least_one_token_is_computed_even_when_the_whole_prompt_is_cached() {
    let mut e = Engine::new(small(1000));
    e.add(1, prompt(1, 16, 0, 0), 1).unwrap();
    drain(&mut e);
    e.add(2, prompt(1, 16, 0, 0), 1).unwrap();
    assert_eq!(e.step().unwrap().prefill_tokens, 4, "the last block is computed again for its logits");
}

#[test]
fn unused_blocks_are_evicted_least_recently_used_first() {
    // 120 blocks: a 400-token prefix is 100 of them, so a second group evicts most of the first.
    let mut e = Engine::new(small(120));
    let run = |e: &mut Engine, id: u64, group: u32| {
        e.add(id, prompt(group, 400, id as u32, 4), 1).unwrap();
        drain(e).1[0].cached_tokens
    };
    assert_eq!(run(&mut e, 1, 1), 0);
    assert_eq!(run(&mut e, 2, 1), 400, "group 1 cached");
    assert_eq!(run(&mut e, 3, 2), 0);
    // Group 2's 101 blocks are the 19 never used, then 82 of group 1's, which were freed
    // last block first: the 19 blocks at the head of group 1's prefix are all that remain.
    assert_eq!(run(&mut e, 4, 1), 76, "group 2 took the room of group 1, the least recently used, tail first");
    assert!(e.pool.evictions > 0);
    let mut off = Engine::new(Params { prefix_caching: false, ..small(1000) });
    assert_eq!(run(&mut off, 1, 1) + run(&mut off, 2, 1), 0, "without prefix caching nothing is a hit");
}

#[test]
fn a_full_cache_preempts_the_newest_running_sequence_which_is_computed_again() {
    // 12 blocks = 48 tokens; two sequences of 8 prompt tokens growing to 28 need 14 blocks.
    let mut e = Engine::new(small(12));
    e.add(1, prompt(1, 0, 1, 8), 20).unwrap();
    e.add(2, prompt(2, 0, 2, 8), 20).unwrap();
    let mut most_running = 0;
    let (mut done, mut t) = (vec![], Duration::ZERO);
    while let Some(s) = e.step() {
        most_running = most_running.max(e.snapshot().running);
        assert!(e.snapshot().kv_usage <= 1.0);
        t += s.duration;
        done.extend(s.finished);
    }
    assert_eq!(most_running, 2);
    done.sort_by_key(|d| d.id);
    assert_eq!(done.iter().map(|d| (d.id, d.output_tokens, d.preemptions)).collect::<Vec<_>>(), vec![(1, 20, 0), (2, 20, 1)], "the newer one is preempted");
    let c = e.snapshot().counters;
    assert_eq!((c.preemptions, c.generation_tokens), (1, 40), "a recomputed sequence keeps the tokens it had generated");
    assert!(c.prefill_tokens > 16, "its prompt and output were computed again: {}", c.prefill_tokens);
    let mut roomy = Engine::new(small(100));
    roomy.add(1, prompt(1, 0, 1, 8), 20).unwrap();
    roomy.add(2, prompt(2, 0, 2, 8), 20).unwrap();
    let (roomy_t, _) = drain(&mut roomy);
    assert!(t > roomy_t, "preemption costs time: {t:?} vs {roomy_t:?}");
    assert_eq!(roomy.snapshot().counters.preemptions, 0);
}

#[test]
fn no_more_than_max_num_seqs_run_and_the_rest_wait_in_order() {
    let mut e = Engine::new(Params { max_num_seqs: 2, ..small(1000) });
    for id in 0..5 {
        e.add(id, prompt(0, 0, id as u32, 8), 4).unwrap();
    }
    let mut order = vec![];
    while let Some(s) = e.step() {
        let snap = e.snapshot();
        assert!(snap.running <= 2, "{snap:?}");
        order.extend(s.finished.iter().map(|d| d.id));
    }
    assert_eq!(order, vec![0, 1, 2, 3, 4]);
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_of_the_token_budget() {
    let mut e = Engine::new(Params { max_batched_tokens: 4096, ..small(5000) });
    e.add(1, prompt(0, 0, 1, 10_000), 2).unwrap();
    let chunks: Vec<u32> = std::iter::from_fn(|| e.step()).map(|s| s.prefill_tokens).collect();
    assert_eq!(chunks, vec![4096, 4096, 1808, 0], "three chunks, then one decode step");
}

#[test]
fn a_decode_step_costs_more_with_more_sequences_and_more_context() {
    let decode_step = |seqs: u64, prompt_len: usize, attn: f64| {
        let mut e = Engine::new(Params { attn_ns_per_token: attn, max_batched_tokens: 10_000, ..small(10_000) });
        for id in 0..seqs {
            e.add(id, prompt(0, 0, id as u32, prompt_len), 5).unwrap();
        }
        e.step();
        let s = e.step().unwrap();
        assert_eq!((s.decoding, s.prefill_tokens), (seqs as u32, 0));
        s.duration
    };
    assert_eq!(decode_step(1, 8, 0.0), Duration::from_micros(1100));
    assert_eq!(decode_step(8, 8, 0.0), Duration::from_micros(1800));
    assert_eq!(decode_step(8, 1000, 1000.0), Duration::from_micros(1800 + 8 * 1001), "1 µs per context token");
}

#[test]
fn the_same_arrivals_give_the_same_steps() {
    let run = || {
        let mut e = Engine::new(small(60));
        for id in 0..12u64 {
            e.add(id, prompt((id % 3) as u32, 40, id as u32, 9), 6 + id as u32).unwrap();
        }
        std::iter::from_fn(|| e.step()).collect::<Vec<_>>()
    };
    let a = run();
    assert!(a.iter().any(|s| !s.finished.is_empty()));
    assert_eq!(a, run());
}

#[test]
fn impossible_requests_are_refused_and_aborts_free_their_blocks() {
    let mut e = Engine::new(Params { max_model_len: 100, ..small(10) });
    assert!(matches!(e.add(1, vec![1; 90], 20), Err(Refused::TooLong { tokens: 110, .. })));
    assert!(matches!(e.add(1, vec![1; 60], 1), Err(Refused::TooLarge { need: 16, have: 10 })));
    assert_eq!(e.add(1, vec![], 1), Err(Refused::Empty));
    e.add(2, vec![3; 20], 5).unwrap();
    e.step();
    assert!(e.snapshot().kv_usage > 0.0);
    e.abort(2);
    assert_eq!((e.snapshot().kv_usage, e.is_idle(), e.snapshot().counters.aborted), (0.0, true, 1));
    assert!(e.step().is_none());
}

#[test]
fn a_prefix_heavy_batch_finishes_far_sooner_grouped_than_shuffled() {
    // 20 prefixes of 400 tokens × 20 questions; the cache holds 5 prefixes' worth.
    let p = Params { max_num_seqs: 16, ..small(500) };
    let mut lines: Vec<(Vec<u32>, u32)> = (0..400u32).map(|i| (prompt(i / 20, 400, i, 12), 8)).collect();
    let (grouped, g) = replay(p, lines.clone()).unwrap();
    let mut rng_state = 7u64;
    for i in (1..lines.len()).rev() {
        rng_state = mix(rng_state, i as u64);
        lines.swap(i, (rng_state % (i as u64 + 1)) as usize);
    }
    let (shuffled, s) = replay(p, lines).unwrap();
    assert!(shuffled.as_secs_f64() > 3.0 * grouped.as_secs_f64(), "grouped {grouped:?}, shuffled {shuffled:?}");
    // Grouped, a group's prefix is computed by the lines admitted in the same step as its
    // first (they cannot hit what is not computed yet), then hit by the rest.
    assert!(g.prefix_hits > 300 * 400, "grouped: most lines hit their group's prefix: {g:?}");
    assert!(s.prefix_hits < g.prefix_hits / 2, "shuffled: {s:?}");
}

#[test]
#[ignore]
fn explore() {
    for (blocks, out, seqs) in [(26_000u32, 64u32, 256u32), (26_000, 200, 256), (8_000, 64, 256), (4_000, 64, 256), (26_000, 16, 256)] {
        let p = Params { num_blocks: blocks, max_num_seqs: seqs, ..Params::default() };
        let lines: Vec<(Vec<u32>, u32)> = (0..10_000u32).map(|i| (prompt(i / 100, 2000, i, 30), out)).collect();
        let (grouped, g) = replay(p, lines.clone()).unwrap();
        let mut l = lines.clone();
        let mut st = 7u64;
        for i in (1..l.len()).rev() {
            st = mix(st, i as u64);
            l.swap(i, (st % (i as u64 + 1)) as usize);
        }
        let (shuffled, s) = replay(p, l).unwrap();
        println!(
            "blocks {blocks} out {out}: grouped {:.1}s (pre {} hits {}) shuffled {:.1}s (pre {} hits {} preempt {}) ratio {:.2}",
            grouped.as_secs_f64(),
            g.preemptions,
            g.prefix_hits,
            shuffled.as_secs_f64(),
            s.preemptions,
            s.prefix_hits,
            s.preemptions,
            shuffled.as_secs_f64() / grouped.as_secs_f64()
        );
    }
}
