/*
 * tap.h - the tiny test harness of the unit tests.
 *
 * CHECK(cond, fmt, ...) records a failure with its location and goes on;
 * REQUIRE stops the test.  tap_done() prints "N passed, M failed" for the
 * program and returns the exit status the automake harness expects
 * (0 all passed, 1 any failed).
 */
#ifndef TAP_H
#define TAP_H
#include <stdio.h>
#include <stdlib.h>

static unsigned tap_passed, tap_failed;

#define CHECK(cond, ...) do { \
	if (cond) { tap_passed++; } else { \
		tap_failed++; \
		fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
		fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); \
	} } while (0)

/* cond is evaluated once: it may have side effects */
#define REQUIRE(cond, ...) do { \
	int tap_ok_ = !!(cond); \
	CHECK(tap_ok_, __VA_ARGS__); \
	if (!tap_ok_) { fprintf(stderr, "stopping: requirement failed: %s\n", #cond); exit(1); } \
	} while (0)

static inline int tap_done(void)
{
	printf("%u passed, %u failed\n", tap_passed, tap_failed);
	return tap_failed ? 1 : 0;
}

/* Deterministic PRNG so a failing seed can be replayed. */
static inline unsigned long long tap_rand(unsigned long long *s)
{
	unsigned long long z = (*s += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

#endif
