"""Healthy: segmentation with BatchNorm and some ignored (255) pixels in every mask, trained
and validated. Nothing is non-finite; nanscope must stay silent."""

import seg_ignore


def build():
    return seg_ignore.build(empty_mask=False)


def main():
    seg_ignore.run(build())


if __name__ == "__main__":
    main()
