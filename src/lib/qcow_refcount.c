/*
 * qcow_refcount.c - refcount entry codec (see qcow_refcount.h).
 */
#include "config.h"
#include "qcow_internal.h"

#include <string.h>

uint64_t qcow_rc_max(unsigned order)
{
	return order >= 6 ? UINT64_MAX : (1ull << (1u << order)) - 1;
}

uint64_t qcow_rc_get(const uint8_t *b, unsigned order, uint64_t i)
{
	switch (order) {
	case 0: case 1: case 2: {
		unsigned bits = 1u << order;
		uint64_t bit = i * bits;
		return (b[bit / 8] >> (bit % 8)) & ((1u << bits) - 1);
	}
	case 3: return b[i];
	case 4: return qcow_get_be16(b + 2 * i);
	case 5: return qcow_get_be32(b + 4 * i);
	default: return qcow_get_be64(b + 8 * i);
	}
}

void qcow_rc_set(uint8_t *b, unsigned order, uint64_t i, uint64_t v)
{
	switch (order) {
	case 0: case 1: case 2: {
		unsigned bits = 1u << order;
		uint64_t bit = i * bits;
		uint8_t mask = (uint8_t)(((1u << bits) - 1) << (bit % 8));
		b[bit / 8] = (uint8_t)((b[bit / 8] & ~mask) | ((v << (bit % 8)) & mask));
		break;
	}
	case 3: b[i] = (uint8_t)v; break;
	case 4: { uint16_t x = htobe16((uint16_t)v); memcpy(b + 2 * i, &x, 2); break; }
	case 5: qcow_put_be32(b + 4 * i, (uint32_t)v); break;
	default: qcow_put_be64(b + 8 * i, v); break;
	}
}

bool qcow_rc_merge_up(uint8_t *up, const uint8_t *disk, const uint8_t *want, unsigned order, uint64_t n)
{
	bool changed = false;
	for (uint64_t i = 0; i < n; i++) {
		uint64_t d = qcow_rc_get(disk, order, i), w = qcow_rc_get(want, order, i);
		qcow_rc_set(up, order, i, d > w ? d : w);
		if (w > d)
			changed = true;
	}
	return changed;
}
