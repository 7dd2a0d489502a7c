/*
 * ctl_picture.c - the picture of an image file (qcowctl map --picture):
 * the summary of the cluster map (struct qcow_picture, from the engine or
 * the daemon) drawn as an SVG grid or as characters in a terminal.
 *
 * Rules:
 *  - The grid is QCOW_PICTURE_MAX_CELLS cells at most, GRID_COLUMNS per
 *    row, whatever the file's length (1 MiB or 10 TiB): the engine scales
 *    the clusters per cell; the picture says the file length, the cluster
 *    size and the clusters per cell, and a legend with every kind and its
 *    cluster count.
 *  - Every kind has one colour (SVG, terminal) and one character
 *    (terminal); the terminal gets colours only when stdout is a tty.
 *  - Text from the command line (the target's name) is escaped for XML.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "qcow.h"
#include "qcowctl.h"

#define GRID_COLUMNS 64
#define CELL_PX 12
#define MARGIN_PX 10
#define LABEL_PX 70   /* the file offset each row starts at, left of the grid */

struct kind_style {
	const char *name;
	const char *colour;   /* SVG fill */
	char glyph;           /* terminal */
	int ansi;             /* terminal colour (256-colour palette) */
};

/* In the order of enum qcow_pic_kind. */
static const struct kind_style styles[QCOW_PIC_NKINDS] = {
	[QCOW_PIC_HEADER] = { "header", "#202020", 'H', 250 },
	[QCOW_PIC_L1] = { "L1 table", "#6a3d9a", '1', 98 },
	[QCOW_PIC_L2] = { "L2 tables", "#b39ddb", '2', 141 },
	[QCOW_PIC_REFTABLE] = { "refcount table", "#8d4a1c", 'R', 130 },
	[QCOW_PIC_REFBLOCK] = { "refcount blocks", "#f4b46a", 'r', 215 },
	[QCOW_PIC_SNAPSHOT] = { "snapshot tables", "#d62728", 'S', 160 },
	[QCOW_PIC_BITMAP] = { "bitmap structures", "#f48fb1", 'B', 211 },
	[QCOW_PIC_DATA] = { "data", "#1f77b4", '#', 33 },
	[QCOW_PIC_COMPRESSED] = { "compressed data", "#80cbc4", 'c', 116 },
	[QCOW_PIC_SHARED] = { "shared data", "#2ca02c", 's', 34 },
	[QCOW_PIC_JUNK] = { "junk", "#ff7f0e", 'j', 208 },
	[QCOW_PIC_ERASED] = { "erased", "#9e9e9e", 'e', 244 },
	[QCOW_PIC_AVAILABLE] = { "available", "#f5f5f5", '.', 255 },
	[QCOW_PIC_MOVING] = { "moving", "#ffeb3b", 'm', 226 },
};

/* "TARGET: 1 MiB file (1048576 bytes), 16 clusters of 64 KiB, 1 cluster per cell" */
static void describe(const struct qcow_picture *pic, char *buf, size_t len)
{
	char fsz[64], csz[64];
	ctl_format_human_size(pic->file_size, fsz, sizeof(fsz));
	ctl_format_human_size(pic->cluster_size, csz, sizeof(csz));
	snprintf(buf, len, "%s file (%" PRIu64 " bytes), %" PRIu64 " clusters of %s, %" PRIu64 " cluster%s per cell",
		 fsz, pic->file_size, pic->clusters, csz, pic->clusters_per_cell,
		 pic->clusters_per_cell == 1 ? "" : "s");
}

static void xml_text(FILE *f, const char *s)
{
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;
		switch (ch) {
		case '&': fputs("&amp;", f); break;
		case '<': fputs("&lt;", f); break;
		case '>': fputs("&gt;", f); break;
		case '"': fputs("&quot;", f); break;
		default:
			/* control bytes are not allowed in XML 1.0 */
			fputc(ch < 0x20 ? '?' : ch, f);
		}
	}
}

static int draw_svg(const struct qcow_picture *pic, const char *target, const char *path)
{
	char line[256];
	uint32_t cols = pic->cells < GRID_COLUMNS ? (pic->cells ? pic->cells : 1) : GRID_COLUMNS;
	uint32_t rows = (pic->cells + GRID_COLUMNS - 1) / GRID_COLUMNS;
	unsigned grid_w = cols * CELL_PX, grid_h = rows * CELL_PX, grid_x = MARGIN_PX + LABEL_PX;
	unsigned legend_y = MARGIN_PX + 40 + grid_h + 16;
	unsigned width = grid_x + grid_w + MARGIN_PX < 560 ? 560 : grid_x + grid_w + MARGIN_PX;
	unsigned height = legend_y + QCOW_PIC_NKINDS * 18 + MARGIN_PX;
	FILE *f = fopen(path, "w");

	if (!f) {
		ctl_print_error("cannot create %s: %s", path, strerror(errno));
		return -1;
	}
	describe(pic, line, sizeof(line));
	fprintf(f, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
		   "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%u\" height=\"%u\" "
		   "viewBox=\"0 0 %u %u\" font-family=\"sans-serif\" font-size=\"12\">\n",
		width, height, width, height);
	fprintf(f, "<title>qcowctl map: ");
	xml_text(f, target);
	fprintf(f, "</title>\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
	fprintf(f, "<text x=\"%u\" y=\"%u\" font-weight=\"bold\">", MARGIN_PX, MARGIN_PX + 12);
	xml_text(f, target);
	fprintf(f, "</text>\n<text class=\"summary\" x=\"%u\" y=\"%u\">%s</text>\n", MARGIN_PX, MARGIN_PX + 30, line);
	/* where each row starts in the file: the scale at a glance */
	fprintf(f, "<g class=\"offsets\" font-size=\"10\" text-anchor=\"end\" fill=\"#606060\">\n");
	for (uint32_t r = 0; r < rows; r++) {
		char at[64];
		ctl_format_human_size((uint64_t)r * GRID_COLUMNS * pic->clusters_per_cell * pic->cluster_size, at,
				      sizeof(at));
		fprintf(f, "<text x=\"%u\" y=\"%u\">%s</text>\n", grid_x - 4,
			MARGIN_PX + 40 + r * CELL_PX + CELL_PX - 2, r ? at : "0");
	}
	fprintf(f, "</g>\n<g class=\"cells\" stroke=\"#d0d0d0\" stroke-width=\"0.5\">\n");
	for (uint32_t i = 0; i < pic->cells; i++) {
		unsigned k = pic->cell[i] < QCOW_PIC_NKINDS ? pic->cell[i] : QCOW_PIC_JUNK;
		fprintf(f, "<rect x=\"%u\" y=\"%u\" width=\"%u\" height=\"%u\" fill=\"%s\"><title>cell %" PRIu32
			   ": %s</title></rect>\n",
			grid_x + (i % GRID_COLUMNS) * CELL_PX, MARGIN_PX + 40 + (i / GRID_COLUMNS) * CELL_PX,
			CELL_PX, CELL_PX, styles[k].colour, i, styles[k].name);
	}
	fprintf(f, "</g>\n<g class=\"legend\">\n");
	for (unsigned k = 0; k < QCOW_PIC_NKINDS; k++) {
		unsigned y = legend_y + k * 18;
		fprintf(f, "<rect x=\"%u\" y=\"%u\" width=\"12\" height=\"12\" fill=\"%s\" stroke=\"#808080\"/>"
			   "<text x=\"%u\" y=\"%u\">%s: %" PRIu64 " cluster%s</text>\n",
			MARGIN_PX, y, styles[k].colour, MARGIN_PX + 18, y + 10, styles[k].name,
			pic->totals[k], pic->totals[k] == 1 ? "" : "s");
	}
	fprintf(f, "</g>\n</svg>\n");
	if (ferror(f) | (fclose(f) != 0)) {
		ctl_print_error("cannot write %s: %s", path, strerror(errno));
		return -1;
	}
	return 0;
}

static void draw_terminal(const struct qcow_picture *pic, const char *target)
{
	bool colour = isatty(STDOUT_FILENO);
	char line[256];

	describe(pic, line, sizeof(line));
	ctl_print_text_safely(target);
	printf(": %s\n", line);
	for (uint32_t i = 0; i < pic->cells; i++) {
		unsigned k = pic->cell[i] < QCOW_PIC_NKINDS ? pic->cell[i] : QCOW_PIC_JUNK;
		if (colour)
			printf("\033[38;5;%dm%c\033[0m", styles[k].ansi, styles[k].glyph);
		else
			putchar(styles[k].glyph);
		if (i % GRID_COLUMNS == GRID_COLUMNS - 1 || i + 1 == pic->cells)
			putchar('\n');
	}
	printf("\n");
	for (unsigned k = 0; k < QCOW_PIC_NKINDS; k++) {
		if (colour)
			printf("  \033[38;5;%dm%c\033[0m", styles[k].ansi, styles[k].glyph);
		else
			printf("  %c", styles[k].glyph);
		printf(" %-18s %" PRIu64 "\n", styles[k].name, pic->totals[k]);
	}
}

int ctl_picture_draw(const struct qcow_picture *pic, const char *target, const char *out)
{
	if (strcmp(out, "-") == 0) {
		draw_terminal(pic, target);
		return 0;
	}
	return draw_svg(pic, target, out);
}
