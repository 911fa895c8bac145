package mime

import (
	"io"
	"slices"
)

// SplitForDraft chooses the parts to take out, largest first, until what
// is left is at most target bytes (or nothing more can go), and returns them with the
// draft's MIME: the message with those parts (and their delimiter lines)
// cut out, and an empty text part where a multipart would be left empty.
func SplitForDraft(root *Part, msg View, target int64) (removed []*Part, draft View) {
	cands := root.attachmentCandidates()
	slices.SortStableFunc(cands, func(x, y *Part) int { return int((y.nextDelim - y.delimStart) - (x.nextDelim - x.delimStart)) })
	left := msg.Size()
	for _, c := range cands {
		if left <= target {
			break
		}
		removed = append(removed, c)
		left -= c.nextDelim - c.delimStart
	}
	slices.SortFunc(removed, func(x, y *Part) int { return int(x.delimStart - y.delimStart) })
	// Multiparts that lose every part keep an empty text part.
	lost := map[*Part]int{} // removed children, by parent
	for _, r := range removed {
		lost[r.parent]++
	}
	emptied := map[*Part]bool{}
	for parent, n := range lost {
		emptied[parent] = n == len(parent.children)
	}
	var pos int64
	for _, r := range removed {
		draft = append(draft, msg.Slice(pos, r.delimStart)...)
		if emptied[r.parent] && r == r.parent.children[0] {
			draft = append(draft, BytesPiece([]byte("--"+r.parent.boundary+"\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n\r\n")))
		}
		pos = r.nextDelim
	}
	draft = append(draft, msg.Slice(pos, msg.Size())...)
	return removed, draft
}

// Parse reads the MIME structure of the message in r (size bytes), with
// bounded memory however large it is.
func Parse(r io.ReaderAt, size int64) (*Part, error) { return parseEntity(r, 0, size, 0) }
