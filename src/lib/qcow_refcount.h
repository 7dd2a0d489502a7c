/*
 * qcow_refcount.h - reading and writing refcount entries of any width.
 *
 * Owns: the encoding of refcount blocks (1 << order bits per entry; sub-
 * byte widths are packed LSB first, byte and wider widths are big-endian
 * integers) and the "up" / "final" block computation of the flush protocol
 * (doc/design.md, "The flush protocol"): up = max(on disk, wanted) per entry, written before
 * the pointers; final = wanted, written after them.
 */
#ifndef QCOW_REFCOUNT_H
#define QCOW_REFCOUNT_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

uint64_t qcow_rc_get(const uint8_t *block, unsigned order, uint64_t i);
void qcow_rc_set(uint8_t *block, unsigned order, uint64_t i, uint64_t v);
/* Largest refcount the width can store. */
uint64_t qcow_rc_max(unsigned order);
/* up[i] = max(disk[i], want[i]) for n entries; returns true when up != disk. */
bool qcow_rc_merge_up(uint8_t *up, const uint8_t *disk, const uint8_t *want, unsigned order, uint64_t n);

#endif
